"""Where SQL lives: loads `sql/queries.sql`, the schema and the migrations from package data."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from durable.errors import ConfigurationError

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_INCLUDE = re.compile(r"^-- include: ([a-z0-9_]+\.sql)$", re.MULTILINE)


def validate_schema(name: str) -> str:
    """Return `name` if it is a safe schema name (lower-case identifier), else raise."""
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid schema name {name!r}: use 1-48 characters of lower-case letters, digits "
            "and '_', not starting with a digit"
        )
    return name


def _read(*parts: str) -> str:
    node = resources.files("durable").joinpath("sql")
    for part in parts:
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def _expand(sql: str) -> str:
    """Replace `-- include: NAME.sql` lines with that file of `sql/` (the runtime's
    functions are written once and included by the schema and the migrations)."""
    return _INCLUDE.sub(lambda m: _read(m[1]), sql)


def render(sql: str, schema: str) -> str:
    """Put the (validated) schema name into a SQL text: `__SCHEMA_NAME__` bare (inside
    literals such as a NOTIFY channel), `__SCHEMA__` quoted."""
    name = validate_schema(schema)
    return sql.replace("__SCHEMA_NAME__", name).replace("__SCHEMA__", '"' + name + '"')


@cache
def _raw_queries() -> dict[str, str]:
    text = _read("queries.sql")
    names = _BLOCK.findall(text)
    bodies = _BLOCK.split(text)[2::2]
    queries: dict[str, str] = {}
    for name, body in zip(names, bodies, strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
        if name in queries:
            raise ConfigurationError(f"query {name!r} is defined twice in queries.sql")
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@dataclass(frozen=True)
class Migration:
    """One numbered file of `sql/migrations`."""

    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration, in version order."""
    folder = resources.files("durable").joinpath("sql").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            text = _expand(entry.read_text(encoding="utf-8"))
            found.append(Migration(int(match[1]), match[2], text))
    found.sort(key=lambda m: m.version)
    return tuple(found)


def functions_sql() -> str:
    """The runtime's functions (`sql/functions.sql`), all `CREATE OR REPLACE`."""
    return _read("functions.sql")


def schema_sql() -> str:
    """The full DDL of a fresh database (`sql/schema.sql`)."""
    return _expand(_read("schema.sql"))


class Queries:
    """The named queries of `queries.sql`, rendered for one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = validate_schema(schema)
        self._queries = {name: render(sql, schema) for name, sql in _raw_queries().items()}

    @property
    def schema_sql(self) -> str:
        """The schema name quoted for SQL text (validated at construction)."""
        return '"' + self.schema + '"'

    def __getitem__(self, name: str) -> str:
        return self._queries[name]

    @property
    def notify_channel(self) -> str:
        """The LISTEN channel on which job inserts wake workers."""
        return f"{self.schema}_jobs"
