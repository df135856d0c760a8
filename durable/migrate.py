"""Applies the schema and pending migrations once, under an advisory lock."""

from __future__ import annotations

import logging

from durable.db import Connection
from durable.sql import Queries, functions_sql, migrations, render, schema_sql

log = logging.getLogger("durable.migrate")

#: Months after the current one whose history partitions migrate() makes ahead.
PARTITIONS_AHEAD = 1


async def migrate(conn: Connection, schema: str) -> list[int]:
    """Bring `schema` up to date on `conn`; return the versions this call applied.

    A fresh database gets `schema.sql` whole and every migration recorded as applied; an
    existing one gets the migrations it lacks, in order, then the runtime's functions.
    Either way the history tables get their partitions for this month and the next
    (`ensure_partitions_v1`) if missing. The transaction-scoped advisory lock makes
    concurrent callers (several workers starting at once) queue up: the first applies, the
    others then find nothing to do.
    """
    queries = Queries(schema)
    all_migrations = migrations()
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"durable.migrate.{schema}"
        )
        table = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".migrations')
        if table is None:
            await conn.execute(render("CREATE SCHEMA IF NOT EXISTS __SCHEMA__", schema))
            await conn.execute(render(schema_sql(), schema))
            await conn.executemany(
                queries["record_migration"], [(m.version, m.name) for m in all_migrations]
            )
            applied = [m.version for m in all_migrations]
        else:
            done = {r[0] for r in await conn.fetch(queries["applied_migrations"])}
            applied = []
            for m in all_migrations:
                if m.version in done:
                    continue
                await conn.execute(render(m.sql, schema))
                await conn.execute(queries["record_migration"], m.version, m.name)
                applied.append(m.version)
            if applied:
                # Functions are not migrations: they come whole, in their newest form,
                # with any migration (see sql/functions.sql). Only code that has a
                # migration the database lacks ever rewrites them, so an older release
                # starting during a rolling deploy never puts its functions back.
                await conn.execute(render(functions_sql(), schema))
        # The history tables' partitions for this month and the next, on every call (an
        # engine opening, a worker starting): a month with no partition of its own puts
        # its runs in the DEFAULT partition, where no month can be dropped whole.
        made = await conn.fetchval(queries["ensure_partitions"], PARTITIONS_AHEAD)
    if applied:
        log.info(
            "applied migrations %s to schema %s",
            applied,
            schema,
            extra={"schema": schema, "versions": applied},
        )
    if made:
        log.info(
            "made history partitions %s in schema %s",
            made,
            schema,
            extra={"schema": schema, "partitions": made},
        )
    return applied
