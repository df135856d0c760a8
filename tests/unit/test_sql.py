"""No database: the query file parser, schema names, DSN redaction and the retry backoff."""

from __future__ import annotations

import re

import pytest

import durable.sql as sql_module
from durable.db import redact
from durable.errors import ConfigurationError
from durable.sql import Queries, migrations, render, schema_sql, validate_schema
from durable.worker import retry_delay

QUEUE_QUERIES = {
    "claim_job",
    "claim_job_by_id",
    "due_state",
    "enqueue_job",
    "delete_job",
    "retry_job",
    "reschedule_job",
    "lease_job",
    "extend_lease",
    "claim_leased_job",
    "count_jobs",
    "applied_migrations",
    "record_migration",
}


# -- queries.sql ---------------------------------------------------------------------------


def test_every_queue_query_is_defined() -> None:
    raw = sql_module._raw_queries()
    assert set(raw) >= QUEUE_QUERIES


def test_query_bodies_are_clean_sql() -> None:
    for name, body in sql_module._raw_queries().items():
        assert body, f"query {name!r} is empty"
        assert body == body.strip()
        assert not body.endswith(";"), name
        assert not any(line.startswith("--") for line in body.splitlines()), name
        # One statement per block: no semicolon except at the very end (removed).
        assert ";" not in body.replace("';'", ""), f"query {name!r} holds two statements"


def test_queries_render_the_quoted_schema() -> None:
    q = Queries("my_schema")
    for name in sql_module._raw_queries():
        text = q[name]
        assert "__SCHEMA__" not in text
    assert '"my_schema".jobs' in q["claim_job"]
    assert "FOR UPDATE SKIP LOCKED" in q["claim_job"]
    assert q.schema == "my_schema"
    assert q.notify_channel == "my_schema_jobs"
    with pytest.raises(KeyError):
        q["no_such_query"]


PARSED = """\
-- Header comment, not a query.

-- first --
-- What the first query does.
SELECT 1
FROM __SCHEMA__.t;

-- second_one --
-- Two lines
-- of description.
UPDATE __SCHEMA__.t SET x = 1  -- trailing comment stays
WHERE y = 2;
"""


def test_the_parser_splits_blocks_and_drops_comment_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_module, "_read", lambda *parts: PARSED)
    parsed = sql_module._raw_queries.__wrapped__()
    assert parsed == {
        "first": "SELECT 1\nFROM __SCHEMA__.t",
        "second_one": "UPDATE __SCHEMA__.t SET x = 1  -- trailing comment stays\nWHERE y = 2",
    }


def test_the_parser_refuses_a_query_defined_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "-- a --\nSELECT 1;\n\n-- a --\nSELECT 2;\n"
    monkeypatch.setattr(sql_module, "_read", lambda *parts: text)
    with pytest.raises(ConfigurationError, match="'a' is defined twice"):
        sql_module._raw_queries.__wrapped__()


def test_the_real_query_file_is_parsed_from_package_data() -> None:
    text = sql_module._read("queries.sql")
    names = re.findall(r"^-- ([a-z_]+) --$", text, re.MULTILINE)
    assert len(names) == len(set(names)) == len(sql_module._raw_queries())


# -- schema and migrations files -----------------------------------------------------------


def test_schema_sql_and_migrations_ship_as_package_data() -> None:
    schema = schema_sql()
    assert "CREATE TABLE __SCHEMA__.jobs" in schema
    found = migrations()
    assert found
    assert [m.version for m in found] == sorted({m.version for m in found})


def test_render_quotes_the_schema_everywhere() -> None:
    assert render("SELECT * FROM __SCHEMA__.a JOIN __SCHEMA__.b", "s1") == (
        'SELECT * FROM "s1".a JOIN "s1".b'
    )
    rendered = render(schema_sql(), "durable")
    assert "__SCHEMA__" not in rendered
    assert '"durable".jobs' in rendered


# -- schema names --------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["durable", "_x", "a1", "jobs_alt", "x" * 48, "public"])
def test_valid_schema_names(good: str) -> None:
    assert validate_schema(good) == good
    assert Queries(good).schema == good


@pytest.mark.parametrize(
    "bad",
    [
        "Durable",
        "a;drop",
        "",
        "1abc",
        "x" * 49,
        "x" * 60,
        'a"b',
        "a b",
        "a-b",
        "a.b",
        "é",
        "durable\n",
        "\ndurable",
        "durable\x00",
    ],
)
def test_invalid_schema_names_raise_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        validate_schema(bad)
    message = str(info.value)
    assert "invalid schema name" in message
    assert repr(bad) in message
    assert "lower-case" in message
    with pytest.raises(ConfigurationError):
        Queries(bad)


@pytest.mark.parametrize("bad", [None, 42, b"durable"])
def test_non_string_schema_names_raise_configuration_error(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        validate_schema(bad)  # type: ignore[arg-type]


# -- redact() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://ann:s3cret@db.example:5432/app", "postgresql://ann:***@db.example:5432/app"),
        ("postgres://ann:s3cret@db/app", "postgres://ann:***@db/app"),
        ("postgresql://ann:pa:ss@db/app", "postgresql://ann:***@db/app"),
        ("postgresql://:s3cret@db/app", "postgresql://:***@db/app"),
        ("postgresql://ann@db/app", "postgresql://ann@db/app"),
        (
            "postgresql://db/app?password=s3cret&sslmode=require",
            "postgresql://db/app?password=***&sslmode=require",
        ),
        (
            "postgresql://db/app?sslmode=require&PASSWORD=s3cret",
            "postgresql://db/app?sslmode=require&PASSWORD=***",
        ),
        ("host=db user=ann password=s3cret dbname=app", "host=db user=ann password=*** dbname=app"),
        (
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "postgresql://postgres@127.0.0.1:5432/postgres",
        ),
    ],
)
def test_redact_hides_passwords(dsn: str, expected: str) -> None:
    assert redact(dsn) == expected
    assert "s3cret" not in redact(dsn)


def test_redact_hides_passwords_in_any_case_of_scheme() -> None:
    # asyncpg (urllib) accepts the scheme in any case, so such a DSN works and gets logged.
    assert "s3cret" not in redact("POSTGRESQL://ann:s3cret@db/app")
    assert "s3cret" not in redact("Postgres://ann:s3cret@db/app")


def test_redact_hides_passwords_inside_longer_text() -> None:
    text = "cannot connect to postgresql://ann:s3cret@db/app: refused"
    assert redact(text) == "cannot connect to postgresql://ann:***@db/app: refused"


# -- retry_delay() -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [
        (0, 1.0),
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (6, 32.0),
        (7, 60.0),
        (8, 60.0),
        (1000, 60.0),
    ],
)
def test_retry_delay_doubles_up_to_a_minute(attempts: int, seconds: float) -> None:
    delay = retry_delay(attempts)
    assert isinstance(delay, float)
    assert delay == seconds


def test_retry_delay_never_decreases() -> None:
    delays = [retry_delay(n) for n in range(-3, 200)]
    assert delays == sorted(delays)
    assert min(delays) == 1.0
    assert max(delays) == 60.0
