"""Query plans of the SQL durable runs, for the plan tests (tests/integration/test_claim_plan.py).

The worker's hot statements live inside PL/pgSQL functions (`claim_v1`), whose plans EXPLAIN
of the call does not show, and the bundled PostgreSQL has no `auto_explain`. So we take the
statements out of the function as the database holds it (`pg_proc.prosrc`), put a typed
parameter where the function has a variable, as PL/pgSQL does, and EXPLAIN them: a custom
plan with the values of a real claim, and the generic plan, which the functions use from
their first call (`SET plan_cache_mode = force_generic_plan`). A cursor (`OPEN c FOR`) is
explained as `DECLARE CURSOR`, which the planner optimises for its first rows, as it does
for PL/pgSQL's cursors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

#: What every statement is explained with (custom: the values of a real call; generic:
#: the plan the functions use, as they say `SET plan_cache_mode = force_generic_plan`).
MODES = ("custom", "generic")

_GENERIC_EXPLAIN = """
CREATE FUNCTION pg_temp.explain_generic(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    plan text;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON, GENERIC_PLAN) ' || q INTO plan;
    RETURN plan;
END
$$
"""

# Where a statement starts inside a PL/pgSQL chunk (after IF ... THEN, ELSE, LOOP, BEGIN).
_START = re.compile(
    r"\b(?P<kw>OPEN\s+\w+\s+FOR|RETURN\s+QUERY|PERFORM|SELECT|INSERT|UPDATE|DELETE|WITH)\b",
    re.IGNORECASE,
)
# A subquery inside an expression: its SELECT, right after an opening parenthesis.
_SUBQUERY = re.compile(r"(?<=\()\s*SELECT\b", re.IGNORECASE)
_SELECT_INTO = re.compile(
    r"^(SELECT\b.*?)\bINTO\s+\w+(?:\s*,\s*\w+)*\s+(FROM\b)", re.IGNORECASE | re.DOTALL
)
_DECLARED = re.compile(r"^\s*(\w+)\s+([\w.\"]+(?:\[\])?)", re.MULTILINE)
_RETURNING_INTO = re.compile(r"(\bRETURNING\b.*?)\s+INTO\s+\w+(?:\s*,\s*\w+)*\s*$", re.DOTALL)


@dataclass(frozen=True)
class Statement:
    """One SQL statement of a function body, with `$n` where the function has variables."""

    sql: str
    #: The variables, in `$n` order: a name (`p_queues`, or `j.id` for a record's field).
    params: tuple[str, ...]
    cursor: bool
    #: The function's own settings (`SET enable_seqscan = off`, ...), which its statements
    #: are planned with.
    settings: tuple[tuple[str, str], ...] = ()

    def explainable(self) -> str:
        return f"DECLARE durable_plan CURSOR FOR {self.sql}" if self.cursor else self.sql


def _balanced(text: str) -> str:
    """`text` up to where its parentheses close more than they open (the end of an
    expression such as `RETURN (SELECT ...)` or `IF EXISTS (SELECT ...) THEN`)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return text[:i]
    return text


def _placeholder(
    params: list[str], name: str, types: Mapping[str, str]
) -> Callable[[re.Match[str]], str]:
    """A substitution putting `$n::type` for variable `name`, numbered in `params`."""

    def sub(_match: re.Match[str]) -> str:
        if name not in params:
            params.append(name)
        return f"${params.index(name) + 1}::{types[name]}"

    return sub


async def function_statements(
    conn: asyncpg.Connection,
    schema: str,
    function: str,
    records: Mapping[str, Mapping[str, str]],
) -> list[Statement]:
    """Every statement of PL/pgSQL function `schema.function` that reads a table.

    `records` gives the field types of the function's record variables (`{"j": {"id":
    "bigint", ...}}`); other variables' types come from the function's arguments and its
    DECLARE section.
    """
    row = await conn.fetchrow(
        """
        SELECT p.prosrc, coalesce(p.proargnames, '{}') AS names,
               coalesce(p.proallargtypes, p.proargtypes::oid[]) AS types,
               p.proargmodes AS modes, coalesce(p.proconfig, '{}') AS config
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = $1 AND p.proname = $2
        """,
        schema,
        function,
    )
    assert row is not None, f"no function {schema}.{function}"
    types: dict[str, str] = {}
    modes = [m.decode() if isinstance(m, bytes) else m for m in row["modes"] or ()]
    for i, (name, oid) in enumerate(zip(row["names"], row["types"], strict=False)):
        if not modes or modes[i] in ("i", "b"):  # not the OUT or TABLE columns
            types[name] = await conn.fetchval("SELECT $1::oid::regtype::text", oid)
    src = re.sub(r"--[^\n]*", "", row["prosrc"])
    head, _, body = src.partition("BEGIN")
    for name, kind in _DECLARED.findall(head.partition("DECLARE")[2]):
        if kind.lower() not in ("record", "refcursor"):
            types[name] = kind
    fields = {f"{r}.{f}": kind for r, cols in records.items() for f, kind in cols.items()}
    # plan_cache_mode aside: the tests choose the plan (`MODES`) themselves.
    settings = tuple(
        tuple(c.split("=", 1)) for c in row["config"] if not c.startswith("plan_cache_mode=")
    )
    found: list[Statement] = []
    for chunk in body.split(";"):
        start = _START.search(chunk)
        if start is None:
            continue
        keyword = start["kw"].upper()
        texts: list[str]
        if chunk[: start.start()].rstrip().endswith("("):
            # Subqueries of an expression (IF EXISTS (SELECT ...) OR ..., RETURN (SELECT ...)):
            # each is planned on its own.
            texts = [_balanced(chunk[m.start() :]) for m in _SUBQUERY.finditer(chunk)]
        elif keyword.startswith(("OPEN", "RETURN")):
            texts = [_balanced(chunk[start.end() :])]
        elif keyword == "PERFORM":
            texts = ["SELECT " + _balanced(chunk[start.end() :])]
        else:
            texts = [_balanced(chunk[start.start() :])]
        for text in texts:
            sql = text.strip()
            if not re.search(rf'(?<!\w)"?{schema}"?\.\w+', sql):
                continue  # an expression, not a read of a table
            sql = _SELECT_INTO.sub(r"\1\2", sql)
            sql = _RETURNING_INTO.sub(r"\1", sql)
            params: list[str] = []
            for name in sorted(fields, key=len, reverse=True):
                rec, field = name.split(".")
                sql = re.sub(
                    rf"(?<![\w.]){rec}\.{field}\b", _placeholder(params, name, fields), sql
                )
            for name in sorted(types, key=len, reverse=True):
                sql = re.sub(rf"(?<![\w.$]){name}\b", _placeholder(params, name, types), sql)
            found.append(
                Statement(sql, tuple(params), keyword.startswith("OPEN"), settings)  # type: ignore[arg-type]
            )
    return found


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan tree, depth first."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


_PARENTS = """
SELECT c.relname, p.relname, c.relpages
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
WHERE c.relnamespace = 'durable'::regnamespace
"""

#: The node type given to a sequential scan of a partition that holds no page (this
#: month's or the next, before runs land there): it reads nothing, and autovacuum's first
#: analyze of the partition, after its first rows, makes the plan again.
EMPTY_PARTITION_SCAN = "Seq Scan (empty partition)"


async def _by_parent(conn: asyncpg.Connection, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`nodes` with each partition of a history table (runs, journal, attempts, signals) and
    each of its indexes named as its partitioned parent (`runs_y2026m12` as `runs`, its
    index as `runs_status_idx`), so that a test asks about the table whatever partition a
    scan reads; the partition's own name stays under "Partition Name" / "Partition Index".
    A sequential scan of an empty partition becomes an `EMPTY_PARTITION_SCAN`."""
    rows = await conn.fetch(_PARENTS)
    parents = {r[0]: r[1] for r in rows}
    empty = {r[0] for r in rows if r[2] == 0}
    for n in nodes:
        if n.get("Relation Name") in parents:
            if n["Node Type"] == "Seq Scan" and n["Relation Name"] in empty:
                n["Node Type"] = EMPTY_PARTITION_SCAN
            n["Partition Name"] = n["Relation Name"]
            n["Relation Name"] = parents[n["Relation Name"]]
        if n.get("Index Name") in parents:
            n["Partition Index"] = n["Index Name"]
            n["Index Name"] = parents[n["Index Name"]]
    return nodes


async def explain(
    conn: asyncpg.Connection, statement: Statement, mode: str, values: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The plan nodes of `statement`: a custom plan for `values` (by variable name), or
    the generic plan."""
    async with conn.transaction():  # a DECLARE needs one
        for name, value in statement.settings:
            await conn.execute("SELECT set_config($1, $2, true)", name, value)
        if mode == "generic":
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_proc WHERE proname = 'explain_generic' "
                "AND pronamespace = pg_my_temp_schema()"
            ):
                await conn.execute(_GENERIC_EXPLAIN)
            raw = await conn.fetchval("SELECT pg_temp.explain_generic($1)", statement.explainable())
        else:
            args = [values[name] for name in statement.params]
            raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + statement.explainable(), *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return await _by_parent(conn, list(plan_nodes(doc[0]["Plan"])))


async def explain_query(conn: asyncpg.Connection, sql: str, *args: Any) -> list[dict[str, Any]]:
    """The plan nodes of query `sql` with `args` (asyncpg sends them with the statement, so
    PostgreSQL plans a custom plan for these values, as for a worker's first executions)."""
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return await _by_parent(conn, list(plan_nodes(doc[0]["Plan"])))


def seq_scans(nodes: list[dict[str, Any]], tables: tuple[str, ...]) -> list[str]:
    """The tables of `tables` that the plan reads with a sequential scan."""
    return [
        n["Relation Name"]
        for n in nodes
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in tables
    ]


def scans_of(nodes: list[dict[str, Any]], table: str) -> list[tuple[str, str | None]]:
    """(node type, index name) of every scan of `table` in the plan."""
    return [
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == table
        or (n["Node Type"] == "Bitmap Index Scan" and table in (n.get("Index Name") or ""))
    ]


def uses_index(nodes: list[dict[str, Any]], table: str, index: str) -> bool:
    return any(
        n["Node Type"] in ("Index Scan", "Index Only Scan")
        and n.get("Relation Name") == table
        and n.get("Index Name") == index
        for n in nodes
    )


async def buffers_of_call(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """Shared buffers (hit or read) one execution of `sql` touched, nested statements of
    the functions it calls included, in a transaction rolled back afterwards."""
    tx = conn.transaction()
    await tx.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
    finally:
        await tx.rollback()
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def explain_analyze(
    conn: asyncpg.Connection, statement: Statement, mode: str, values: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The plan nodes of `statement` as it ran with `values`, in a transaction rolled back
    afterwards (it may lock rows): a custom plan, or the generic plan (a prepared statement
    under plan_cache_mode = force_generic_plan), which prunes partitions only as it runs.
    A node that never ran has "Actual Loops" 0. A cursor's query is run as a query."""
    args = [values[name] for name in statement.params]
    if mode == "generic":  # outside the transaction, which would not undo it
        await conn.execute("PREPARE durable_plan AS " + statement.sql)
    tx = conn.transaction()
    await tx.start()
    try:
        for name, value in statement.settings:
            await conn.execute("SELECT set_config($1, $2, true)", name, value)
        if mode == "generic":
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            # EXECUTE takes no parameters of its own statement: the values go as literals.
            types = dict(
                re.findall(
                    r"\$(\d+)::((?:timestamp|time) with(?:out)? time zone|[\w.\[\]]+)",
                    statement.sql,
                )
            )
            literals = [
                await conn.fetchval(f"SELECT quote_nullable($1::{types[str(i + 1)]})", value)
                for i, value in enumerate(args)
            ]
            sql = f"EXECUTE durable_plan({', '.join(literals)})" if args else "EXECUTE durable_plan"
            args = []
        else:
            sql = statement.sql
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
    finally:
        await tx.rollback()
        if mode == "generic":
            await conn.execute("DEALLOCATE durable_plan")
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return await _by_parent(conn, list(plan_nodes(doc[0]["Plan"])))
