"""Poison and bad input (issue 7): values that are not JSON, NUL characters, 10 MB payloads,
hostile names, runs of workflows no worker knows, definitions that change under runs in
flight, invalid schema names and DSN passwords.

Every refused input is checked twice: the error (type and message) and a snapshot of every
durable table taken before and after, which must be equal (nothing else changed). The
database is seeded first (`seeded` fixture) so that the snapshots compare real rows.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import sys
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from helpers import (
    eventually,
    execute,
    fetch,
    fetchval,
    open_engine,
    run_status,
    running_engine,
)

import durable

TABLES = ("runs", "journal", "jobs", "signals", "attempts")
SIDE_TABLE = "CREATE TABLE side (v text NOT NULL)"


# -- helpers -------------------------------------------------------------------------------


async def snapshot(engine: durable.Engine) -> dict[str, Any]:
    """Every row of every durable table, as JSON text, sorted; plus the schema's tables."""
    snap: dict[str, Any] = {}
    async with engine.pool.acquire() as conn:
        for table in TABLES:
            rows = await conn.fetch(f"SELECT to_jsonb(t)::text FROM durable.{table} t ORDER BY 1")
            snap[table] = [r[0] for r in rows]
        snap["tables"] = [
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'durable' ORDER BY 1"
            )
        ]
    return snap


def seed_workflow() -> durable.Workflow:
    wf = durable.Workflow("seed")

    async def flaky(ctx: durable.Context) -> dict[str, int]:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return {"attempt": ctx.attempt}

    wf.step("flaky", flaky, backoff=0)
    wf.wait_for_signal("go", "go")
    return wf


@pytest.fixture
async def seeded(db: Any) -> Any:
    """`db` holding a completed run (journal rows, a failed attempt, a consumed signal) and a
    pending run of workflow `seed` with a job and a buffered signal. Later workers in these
    tests do not register `seed`, so those rows must stay exactly as they are."""
    wf = seed_workflow()
    async with running_engine(db, wf) as engine:
        done = await engine.start("seed", {"n": 1})
        assert await engine.signal(done, "go", {"ok": True})
        await engine.wait(done, timeout=10)
    async with open_engine(db, wf) as engine:
        pending = await engine.start("seed", {"n": 2}, idempotency_key="seed-2")
        assert await engine.signal(pending, "go", {"early": True})
        snap = await snapshot(engine)
    assert all(snap[t] for t in TABLES), snap  # every table has rows to compare
    return db


def one_step(name: str = "order") -> durable.Workflow:
    wf = durable.Workflow(name)

    async def work(ctx: durable.Context) -> Any:
        return ctx.input

    wf.step("work", work)
    return wf


class Opaque:
    """A custom class json knows nothing about."""

    def __repr__(self) -> str:
        return "Opaque()"


def durable_cli() -> str:
    """The real `durable` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("durable")
    if script.exists():
        return str(script)
    found = shutil.which("durable")
    assert found, "the durable console script is not installed"
    return found


async def cli(*args: str) -> tuple[int, str, str]:
    result = await anyio.run_process([durable_cli(), *args], check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- non-JSON and NUL input ----------------------------------------------------------------

NOT_JSON = [
    pytest.param({1, 2}, "Object of type set is not JSON serializable", id="set"),
    pytest.param(object(), "Object of type object is not JSON serializable", id="object"),
    pytest.param(Opaque(), "Object of type Opaque is not JSON serializable", id="custom-class"),
    pytest.param(float("nan"), "Out of range float values are not JSON compliant", id="nan"),
    pytest.param(float("inf"), "Out of range float values are not JSON compliant", id="inf"),
    pytest.param(b"bytes", "Object of type bytes is not JSON serializable", id="bytes"),
    pytest.param(
        datetime(2024, 1, 1, tzinfo=UTC),
        "Object of type datetime is not JSON serializable",
        id="datetime",
    ),
    pytest.param({(1, 2): "tuple key"}, "keys must be str, int, float, bool or None", id="key"),
]


@pytest.mark.parametrize(("bad", "detail"), NOT_JSON)
async def test_non_json_input_raises_naming_the_input_and_writes_nothing(
    seeded: Any, bad: Any, detail: str
) -> None:
    async with open_engine(seeded, one_step(), seed_workflow()) as engine:
        before = await snapshot(engine)
        with pytest.raises(durable.SerializationError) as caught:
            await engine.start("order", {"ok": 1, "nested": [{"bad": bad}]}, idempotency_key="k")
        assert str(caught.value).startswith(
            "input of workflow 'order' is not JSON-serializable: "
        ), str(caught.value)
        assert detail in str(caught.value)
        assert await snapshot(engine) == before
        # The idempotency key was not taken: the corrected request creates the run.
        run_id = await engine.start("order", {"ok": 1}, idempotency_key="k")
        assert (await engine.get_run(run_id)).input == {"ok": 1}


async def test_input_that_is_not_a_mapping_is_refused_before_any_write(seeded: Any) -> None:
    async with open_engine(seeded, one_step(), seed_workflow()) as engine:
        before = await snapshot(engine)
        for bad in ({1, 2}, [1, 2], "text", b"bytes", 42):
            with pytest.raises(TypeError, match=r"input must be a mapping \(a JSON object\), got"):
                await engine.start("order", bad)  # type: ignore[arg-type]
        assert await snapshot(engine) == before


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"s": "a\x00b"}, id="value"),
        pytest.param({"a\x00": 1}, id="key"),
        pytest.param({"deep": [{"x": ["\x00"]}]}, id="nested"),
    ],
)
async def test_nul_in_input_raises_serialization_error_and_writes_nothing(
    seeded: Any, bad: dict[str, Any]
) -> None:
    async with open_engine(seeded, one_step(), seed_workflow()) as engine:
        before = await snapshot(engine)
        with pytest.raises(durable.SerializationError) as caught:
            await engine.start("order", bad)
        assert str(caught.value) == (
            "input of workflow 'order' contains a NUL character, which PostgreSQL cannot store"
        )
        assert await snapshot(engine) == before


async def test_a_literal_backslash_u0000_is_not_a_nul_and_round_trips(db: Any) -> None:
    text = "C:\\u0000\\dir and a JSON escape written out: \\u0000"
    assert "\x00" not in text
    async with running_engine(db, one_step()) as engine:
        run_id = await engine.start("order", {"text": text})
        assert await engine.wait(run_id, timeout=10) == {"work": {"text": text}}


async def test_non_json_signal_payload_raises_and_writes_nothing(seeded: Any) -> None:
    async with open_engine(seeded, seed_workflow()) as engine:
        pending = (await engine.list_runs(status="pending"))[0].id
        before = await snapshot(engine)
        for bad, detail in [
            ({1, 2}, "is not JSON-serializable: Object of type set is not JSON serializable"),
            (object(), "is not JSON-serializable: Object of type object"),
            ({"x": float("nan")}, "is not JSON-serializable: Out of range float values"),
            (b"raw", "is not JSON-serializable: Object of type bytes"),
            ({"at": datetime.now(UTC)}, "is not JSON-serializable: Object of type datetime"),
            ({"s": "nul\x00"}, "contains a NUL character, which PostgreSQL cannot store"),
        ]:
            with pytest.raises(durable.SerializationError) as caught:
                await engine.signal(pending, "go", bad)
            assert str(caught.value).startswith("payload of signal 'go' "), str(caught.value)
            assert detail in str(caught.value)
            # The payload is checked before the run is even looked up.
            with pytest.raises(durable.SerializationError):
                await engine.signal("no-such-run", "go", bad)
        assert await snapshot(engine) == before


async def test_nul_in_names_and_keys_writes_nothing(seeded: Any) -> None:
    """Names and keys are text columns, where PostgreSQL refuses NUL: refused before any
    write (see the next test for the errors)."""
    async with open_engine(seeded, one_step(), seed_workflow()) as engine:
        pending = (await engine.list_runs(status="pending"))[0].id
        before = await snapshot(engine)
        with pytest.raises(ValueError, match="NUL"):
            await engine.start("order", {}, idempotency_key="key\x00")
        with pytest.raises(ValueError, match="NUL"):
            await engine.signal(pending, "go\x00", 1)
        assert await snapshot(engine) == before


async def test_nul_in_names_and_keys_is_refused_with_a_clear_error(seeded: Any) -> None:
    with pytest.raises(durable.DefinitionError, match="NUL"):
        durable.Workflow("nul\x00flow")

    async def work(ctx: durable.Context) -> None:
        return None

    with pytest.raises(durable.DefinitionError, match="NUL"):
        durable.Workflow("ok").step("step\x00name", work)
    async with open_engine(seeded, one_step(), seed_workflow()) as engine:
        pending = (await engine.list_runs(status="pending"))[0].id
        with pytest.raises((durable.DurableError, ValueError), match="NUL"):
            await engine.start("order", {}, idempotency_key="key\x00")
        with pytest.raises((durable.DurableError, ValueError), match="NUL"):
            await engine.signal(pending, "go\x00", 1)


# -- odd arguments to the client operations ------------------------------------------------

# (call, the error it raises, the other base class it must have). `R` is a pending run's id.
ODD_ARGUMENTS: list[Any] = [
    pytest.param(lambda e, r: e.get_run(123), durable.ArgumentTypeError, id="get_run-int"),
    pytest.param(lambda e, r: e.get_run(None), durable.ArgumentTypeError, id="get_run-none"),
    pytest.param(lambda e, r: e.get_run("a\x00b"), durable.RunNotFound, id="get_run-nul"),
    pytest.param(lambda e, r: e.get_run("\ud800"), durable.RunNotFound, id="get_run-surrogate"),
    pytest.param(lambda e, r: e.signal(123, "go"), durable.ArgumentTypeError, id="signal-int-id"),
    pytest.param(lambda e, r: e.signal("a\x00", "go"), durable.RunNotFound, id="signal-nul-id"),
    pytest.param(lambda e, r: e.signal(r, 5), durable.ArgumentTypeError, id="signal-int-name"),
    pytest.param(lambda e, r: e.signal(r, "\ud800"), durable.ArgumentError, id="signal-surrogate"),
    pytest.param(lambda e, r: e.cancel(123), durable.ArgumentTypeError, id="cancel-int"),
    pytest.param(lambda e, r: e.cancel("\ud800"), durable.RunNotFound, id="cancel-surrogate"),
    pytest.param(
        lambda e, r: e.cancel(r, reason="\ud800"), durable.ArgumentError, id="cancel-reason"
    ),
    pytest.param(lambda e, r: e.cancel(r, reason=5), durable.ArgumentTypeError, id="reason-int"),
    pytest.param(lambda e, r: e.retry(123), durable.ArgumentTypeError, id="retry-int"),
    pytest.param(lambda e, r: e.retry("\x00"), durable.RunNotFound, id="retry-nul"),
    pytest.param(lambda e, r: e.wait(123, timeout=5), durable.ArgumentTypeError, id="wait-int"),
    pytest.param(lambda e, r: e.wait("a\x00", timeout=5), durable.RunNotFound, id="wait-nul"),
    pytest.param(lambda e, r: e.list_runs(limit="5"), durable.ArgumentTypeError, id="limit-str"),
    pytest.param(lambda e, r: e.list_runs(limit=True), durable.ArgumentTypeError, id="limit-bool"),
    pytest.param(
        lambda e, r: e.list_runs(limit=2**70), durable.ArgumentError, id="limit-too-large"
    ),
    pytest.param(
        lambda e, r: e.list_runs(workflow=5), durable.ArgumentTypeError, id="list-workflow-int"
    ),
    pytest.param(lambda e, r: e.list_runs(status="bogus"), durable.ArgumentError, id="status"),
    pytest.param(lambda e, r: e.purge(older_than=5), durable.ArgumentTypeError, id="purge-int"),
    pytest.param(
        lambda e, r: e.purge(older_than=timedelta(days=999_999_999)),
        durable.ArgumentError,
        id="purge-before-time",
    ),
    pytest.param(
        lambda e, r: e.purge(older_than=timedelta(days=1), batch_size=1.5),
        durable.ArgumentTypeError,
        id="purge-batch-float",
    ),
    pytest.param(
        lambda e, r: e.start("seed", {}, idempotency_key="\ud800"),
        durable.ArgumentError,
        id="key-surrogate",
    ),
    pytest.param(
        lambda e, r: e.start("seed", {}, idempotency_key=7),
        durable.ArgumentTypeError,
        id="key-int",
    ),
]


@pytest.mark.parametrize(("call", "error"), ODD_ARGUMENTS)
async def test_odd_arguments_raise_durable_errors_and_write_nothing(
    seeded: Any, call: Any, error: type[durable.DurableError]
) -> None:
    """Item 11: no raw asyncpg error (DataError, CharacterNotInRepertoireError...) comes
    out of the client operations. A wrong type is an `ArgumentTypeError` (a TypeError), a
    value durable cannot take an `ArgumentError` (a ValueError), and a run id that no run
    can have (NUL, lone surrogate) is a `RunNotFound`. Nothing is written."""
    async with open_engine(seeded, seed_workflow()) as engine:
        pending = (await engine.list_runs(status="pending"))[0].id
        before = await snapshot(engine)
        with pytest.raises(error) as caught:
            await call(engine, pending)
        assert await snapshot(engine) == before
    refused = caught.value
    assert type(refused) is error, repr(refused)
    assert isinstance(refused, durable.DurableError)
    if error is durable.ArgumentTypeError:
        assert isinstance(refused, TypeError)
    if error is durable.ArgumentError:
        assert isinstance(refused, ValueError)
    assert not isinstance(refused, asyncpg.PostgresError)


async def test_a_workflow_name_no_workflow_can_have_lists_no_runs(seeded: Any) -> None:
    async with open_engine(seeded, seed_workflow()) as engine:
        assert await engine.list_runs(workflow="seed\x00") == []
        assert await engine.list_runs(workflow="\ud800") == []
        assert len(await engine.list_runs(workflow="seed")) == 2


async def test_retrying_a_run_whose_shape_is_not_recorded_is_a_configuration_error(
    db: Any,
) -> None:
    """Item 11: `retry` needs the recorded shape of the run's workflow (DU002 in SQL). An
    engine that does not register the workflow, on a database where no engine recorded its
    shape, raises `ConfigurationError` saying what to do, and changes nothing."""
    wf = durable.Workflow("shapeless")

    @wf.step(max_attempts=1)
    async def boom(ctx: durable.Context) -> None:
        raise durable.NonRetryable("boom")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        await execute(engine, "DELETE FROM durable.shapes")
    async with open_engine(db, one_step()) as other:
        with pytest.raises(durable.ConfigurationError, match="not recorded") as caught:
            await other.retry(run_id)
        assert "open an Engine that registers this workflow" in str(caught.value)
        assert await run_status(other, run_id) == "failed"


# -- results a handler returns -------------------------------------------------------------

BAD_RESULTS: dict[str, tuple[Any, str]] = {
    "set": ({1, 2}, "is not JSON-serializable: Object of type set is not JSON serializable"),
    "object": (object(), "is not JSON-serializable: Object of type object is not JSON"),
    "custom": (Opaque(), "is not JSON-serializable: Object of type Opaque is not JSON"),
    "datetime": (datetime(2024, 1, 1, tzinfo=UTC), "Object of type datetime is not JSON"),
    "bytes": (b"raw", "is not JSON-serializable: Object of type bytes is not JSON"),
    "nan": ({"x": math.nan}, "is not JSON-serializable: Out of range float values"),
    "tuple-key": ({(1, 2): 3}, "is not JSON-serializable: keys must be str, int, float"),
    "nul": ({"s": "a\x00b"}, "contains a NUL character, which PostgreSQL cannot store"),
}


async def test_a_result_that_cannot_be_stored_fails_the_node_rolls_back_and_compensates(
    seeded: Any,
) -> None:
    """The result is serialized inside the attempt: SerializationError fails the node at
    once (retrying would return the same value), the handler's ctx.conn writes roll back,
    earlier steps are compensated, and no row of any other run changes."""
    calls: list[tuple[str, int]] = []
    wf = durable.Workflow("bad_result")

    async def prior(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", f"prior {ctx.input['kind']}")
        return "prior done"

    async def undo_prior(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", f"undone {ctx.input['kind']}")

    async def produce(ctx: durable.Context) -> Any:
        calls.append((ctx.input["kind"], ctx.attempt))
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", f"produce {ctx.input['kind']}")
        return BAD_RESULTS[ctx.input["kind"]][0]

    wf.step("prior", prior, compensate=undo_prior)
    wf.step("produce", produce, max_attempts=3, backoff=0)

    async with open_engine(seeded, wf, seed_workflow(), setup=SIDE_TABLE) as engine:
        before = await snapshot(engine)
    async with running_engine(seeded, wf) as engine:
        ids = {kind: await engine.start("bad_result", {"kind": kind}) for kind in BAD_RESULTS}
        for kind, run_id in ids.items():
            with pytest.raises(durable.RunFailed) as failed:
                await engine.wait(run_id, timeout=15)
            run = await engine.get_run(run_id, journal=True)
            assert failed.value.run.error == run.error
            assert run.status is durable.RunStatus.FAILED
            assert run.error is not None
            assert run.error.startswith("SerializationError: result of step 'produce' "), run.error
            assert BAD_RESULTS[kind][1] in run.error, (kind, run.error)
            assert [(e.key, e.status) for e in run.journal] == [
                ("prior", "completed"),
                ("produce", "failed"),
                ("prior@compensate", "completed"),
            ]
            assert [(a.key, a.attempt) for a in run.attempts] == [("produce", 1)]
            assert (
                await fetchval(
                    engine, "SELECT count(*) FROM durable.jobs WHERE run_id = $1", run_id
                )
                == 0
            )
        side = sorted(r[0] for r in await fetch(engine, "SELECT v FROM side"))
        assert side == sorted(
            [f"prior {k}" for k in BAD_RESULTS] + [f"undone {k}" for k in BAD_RESULTS]
        )  # no 'produce ...' row: every failing attempt's writes rolled back
        assert sorted(calls) == sorted((k, 1) for k in BAD_RESULTS)  # not retried
        after = await snapshot(engine)
    for table in TABLES:
        untouched = [row for row in after[table] if not any(i in row for i in ids.values())]
        assert untouched == before[table], table


STORED_KEYS = {"1": "one", "1.5": "x", "false": "f", "null": "n", "nested": {"2": [3, {"4": 5}]}}


def keys_workflow(seen: dict[str, Any]) -> durable.Workflow:
    wf = durable.Workflow("keys")

    async def first(ctx: durable.Context) -> Any:
        return {1: "one", 1.5: "x", False: "f", None: "n", "nested": {2: (3, {4: 5})}}

    async def second(ctx: durable.Context) -> Any:
        seen["second"] = ctx.results["first"]
        return {"1": "str"}

    async def third(ctx: durable.Context) -> None:
        seen["third"] = ctx.results["first"]

    wf.step("first", first).step("second", second)
    wf.wait_for_signal("wait", "go").step("third", third)
    return wf


async def parked(engine: durable.Engine, run_id: str) -> bool:
    return await run_status(engine, run_id) == "waiting"


async def test_non_string_keys_are_stored_as_json_object_keys(db: Any) -> None:
    """JSON object keys are strings, as with `json.dumps`: int, float, bool and None keys
    are stored as "1", "1.5", "false", "null" and tuples as lists (docs/reliability.md)."""
    seen: dict[str, Any] = {}
    async with running_engine(db, keys_workflow(seen)) as engine:
        run_id = await engine.start("keys", {7: "seven", "t": (1, 2)})  # type: ignore[dict-item]
        await eventually(lambda: parked(engine, run_id))
        assert await engine.signal(run_id, "go")
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id)
    assert run.input == {"7": "seven", "t": [1, 2]}
    assert result == {"first": STORED_KEYS, "second": {"1": "str"}, "wait": None, "third": None}
    # A node that runs after the run was parked (and re-read) sees the stored form.
    assert seen["third"] == STORED_KEYS


async def test_a_result_with_keys_json_writes_alike_fails_the_node_clearly(db: Any) -> None:
    """A dict holding both 1 and "1" would lose one of them as JSON: the result is a
    `SerializationError` naming both keys, and the node fails (it would fail again)."""
    wf = durable.Workflow("clash")

    @wf.step
    async def both(ctx: durable.Context) -> Any:
        return {1: "int", "1": "str"}

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id)
    assert run.error is not None
    assert run.error.startswith("SerializationError: result of step 'both' is not storable")
    assert "keys 1 and '1' would both be stored as '1'" in run.error


async def test_the_next_node_sees_a_result_as_it_was_stored(db: Any) -> None:
    # One slot, so that `second` always continues on the slot that ran `first` (with more
    # slots another one may claim the job first, read the run, and see the stored form).
    seen: dict[str, Any] = {}
    async with running_engine(db, keys_workflow(seen), concurrency=1) as engine:
        run_id = await engine.start("keys", {})
        await eventually(lambda: parked(engine, run_id))
        assert await engine.signal(run_id, "go")
        await engine.wait(run_id, timeout=10)
    assert seen["third"] == STORED_KEYS
    assert seen["second"] == seen["third"]


# -- 10 MB payloads ------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


def big_text(seed: str) -> str:
    """About 10 MB of JSON-escaping-heavy text: quotes, backslashes, unicode, newlines."""
    unit = f'{seed} "q" \\ é 🚀 שלום\n\t'
    encoded = len(json.dumps(unit, ensure_ascii=False).encode()) - 2
    return unit * (TEN_MB // encoded + 1)


async def test_ten_megabyte_input_result_and_signal_payload_round_trip(db: Any) -> None:
    big_input = {"blob": big_text("input"), "n": 1}
    big_signal = {"blob": big_text("signal")}
    assert len(json.dumps(big_input, ensure_ascii=False).encode()) >= TEN_MB
    wf = durable.Workflow("big")

    async def echo(ctx: durable.Context) -> dict[str, Any]:
        return {"reversed": ctx.input["blob"][::-1]}

    async def check(ctx: durable.Context) -> int:
        assert ctx.results["echo"]["reversed"] == big_input["blob"][::-1]
        assert ctx.results["more"] == big_signal
        return len(ctx.results["more"]["blob"])

    wf.step("echo", echo).wait_for_signal("more", "big").step("check", check)
    timings: dict[str, float] = {}
    async with running_engine(db, wf) as engine:
        t0 = time.perf_counter()
        run_id = await engine.start("big", big_input)
        timings["start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert await engine.signal(run_id, "big", big_signal)
        timings["signal"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = await engine.wait(run_id, timeout=120)
        timings["run"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = await engine.get_run(run_id, journal=True)
        timings["read back"] = time.perf_counter() - t0
        sizes = await fetch(
            engine,
            "SELECT key, octet_length(result::text) AS n FROM durable.journal "
            "WHERE run_id = $1 ORDER BY seq",
            run_id,
        )
    print("\n10 MB payloads: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    assert run.input == big_input
    assert result == {
        "echo": {"reversed": big_input["blob"][::-1]},
        "more": big_signal,
        "check": len(big_signal["blob"]),
    }
    assert run.results == result
    assert {r["key"]: r["n"] >= TEN_MB for r in sizes} == {
        "echo": True,
        "more": True,
        "check": False,
    }


# -- hostile names and payloads ------------------------------------------------------------

SQL = "'; DROP TABLE durable.runs; --"
HOSTILE = [
    SQL,
    "$1",
    "$$",
    "$tag$ body $tag$",
    'quote \' and "double" and `back`',
    "back\\slash \\\\ \\n \\x41",
    "emoji 🚀🔥👩‍👩‍👧",
    "RTL שלום مرحبا \u202eevil\u202c",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "zero width \u200b\u200d\ufeff",
    "format %s %(x)s {0} {x}",
    "new\nline\ttab\r",
    "-- comment /* block */ ; COMMIT; ROLLBACK;",
    '" OR 1=1; SELECT pg_sleep(10); --',
]


async def test_hostile_names_and_payloads_are_stored_verbatim(db: Any) -> None:
    """Quotes, backslashes, unicode and SQL fragments in workflow, node and signal names,
    idempotency keys and payload keys and values are stored verbatim and round-trip exactly;
    every table is intact afterwards."""
    wf_name = f'wf {SQL} "q" \\ $1 $$ 🚀 e\u0301'
    step_names = [f"step {i}: {h}" for i, h in enumerate(HOSTILE)]
    signal_name = f'signal {SQL} $1 $$ \\ " 🚀 \u202e'
    wait_name = f"wait {SQL}"
    payload = {h: [h, {h: h}] for h in HOSTILE}
    key = f'idem {SQL} $1 $$ \\ " 🚀'
    seen: dict[str, Any] = {}
    wf = durable.Workflow(wf_name)

    def make(name: str) -> Any:
        async def handler(ctx: durable.Context) -> Any:
            assert ctx.workflow == wf_name
            assert ctx.node == name
            assert ctx.input == payload
            seen[name] = True
            return {"node": name, "payload": ctx.input}

        return handler

    for name in step_names:
        wf.step(name, make(name))
    wf.wait_for_signal(wait_name, signal_name)

    async with running_engine(db, wf) as engine:
        tables_before = await snapshot(engine)
        run_id = await engine.start(wf_name, payload, idempotency_key=key)
        assert await engine.start(wf_name, payload, idempotency_key=key) == run_id
        assert await engine.signal(run_id, signal_name, payload)
        result = await engine.wait(run_id, timeout=20)
        run = await engine.get_run(run_id, journal=True)
        stored = await fetch(
            engine,
            "SELECT workflow, idempotency_key, input FROM durable.runs WHERE id = $1",
            run_id,
        )
        signals = await fetch(engine, "SELECT name, payload::text AS payload FROM durable.signals")
        listed = await engine.list_runs(workflow=wf_name)
        tables_after = await snapshot(engine)

    assert set(seen) == set(step_names)
    expected = {name: {"node": name, "payload": payload} for name in step_names}
    expected[wait_name] = payload
    assert result == expected
    assert run.workflow == wf_name
    assert run.input == payload
    assert [e.key for e in run.journal] == [*step_names, wait_name]
    assert stored[0]["workflow"] == wf_name
    assert stored[0]["idempotency_key"] == key
    assert json.loads(stored[0]["input"]) == payload
    assert [(s["name"], json.loads(s["payload"])) for s in signals] == [(signal_name, payload)]
    assert [r.id for r in listed] == [run_id]
    assert tables_after["tables"] == tables_before["tables"]
    assert "runs" in tables_after["tables"]
    assert len(tables_after["runs"]) == 1


async def test_hostile_names_survive_the_cli(db: Any) -> None:
    wf_name = f"wf {SQL} $1 $$"
    wf = durable.Workflow(wf_name)

    async def step(ctx: durable.Context) -> Any:
        return ctx.input

    wf.step(f'node {SQL} " \\ 🚀', step)
    payload = {SQL: '$$ \\ " 🚀 \u202e'}
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf_name, payload)
        await engine.wait(run_id, timeout=10)
    code, out, err = await cli("--dsn", db.dsn, "--json", "runs", "show", run_id)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["workflow"] == wf_name
    assert shown["input"] == payload
    code, out, err = await cli("--dsn", db.dsn, "--json", "runs", "list", "--workflow", wf_name)
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == [run_id]


# -- a workflow no worker knows ------------------------------------------------------------


async def test_a_run_whose_workflow_no_worker_knows_waits_pending_for_one_that_does(
    db: Any,
) -> None:
    known = durable.Workflow("known")

    async def ran(ctx: durable.Context) -> str:
        return "known ran"

    known.step("ran", ran)
    async with open_engine(db, one_step("orphan")) as starter:
        orphan = await starter.start("orphan", {"sku": "A1"})
        job_before = await fetch(starter, "SELECT to_jsonb(j)::text FROM durable.jobs j")

    # A worker that knows only `known` runs five of its runs and leaves `orphan` alone. Not
    # a matter of time: the orphan's job is older than every job of `known`, and a claim
    # takes the most urgent due job first, so each of these claims passed it over.
    async with running_engine(db, known, poll_interval=0.05) as other:
        for _ in range(5):
            assert await other.wait(await other.start("known"), timeout=10) == {"ran": "known ran"}
        run = await other.get_run(orphan, journal=True)
        pending = await other.list_runs(status="pending")
        listed = await other.list_runs()
        job_after = await fetch(
            other, "SELECT to_jsonb(j)::text FROM durable.jobs j WHERE run_id = $1", orphan
        )
    assert run.status is durable.RunStatus.PENDING
    assert run.error is None
    assert run.journal == ()
    assert run.attempts == ()
    assert [r.id for r in pending] == [orphan]
    assert orphan in [r.id for r in listed]
    assert job_after == job_before  # not claimed, not retried, not touched

    code, out, err = await cli("--dsn", db.dsn, "runs", "list")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith(orphan))
    assert line.split()[:5] == [orphan, "orphan", "1", "pending", "work"]
    code, out, err = await cli("--dsn", db.dsn, "--json", "runs", "list", "--status", "pending")
    assert code == 0, err
    assert [(r["id"], r["workflow"], r["status"]) for r in json.loads(out)] == [
        (orphan, "orphan", "pending")
    ]

    # A worker that knows it comes along: the run completes.
    async with running_engine(db, one_step("orphan")) as engine:
        assert await engine.wait(orphan, timeout=10) == {"work": {"sku": "A1"}}


# -- definitions that change while runs are in flight --------------------------------------


def versioned(name: str, *nodes: str, log: list[str] | None = None) -> durable.Workflow:
    """A workflow whose nodes are steps, except `wait*` names (signal waits for 'go')."""
    wf = durable.Workflow(name)

    def make(node: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            if log is not None:
                log.append(f"{ctx.run_id[-6:]} {node}")
            return f"{node} done"

        async def undo(ctx: durable.Context) -> None:
            if log is not None:
                log.append(f"{ctx.run_id[-6:]} {node}@compensate")

        return handler, undo

    for node in nodes:
        if node.startswith("wait"):
            wf.wait_for_signal(node, "go")
        else:
            handler, undo = make(node)
            wf.step(node, handler, compensate=undo)
    return wf


async def park(db: Any, wf: durable.Workflow, *others: durable.Workflow, n: int = 1) -> list[str]:
    """Start `n` runs of `wf` on a worker that knows the old definition and return once
    they are all parked on their signal wait."""
    async with running_engine(db, wf, *others) as engine:
        ids = [await engine.start(wf.name, {"i": i}) for i in range(n)]

        async def parked() -> bool:
            return all([await run_status(engine, r) == "waiting" for r in ids])

        await eventually(parked)
    return ids


async def jobs_of(engine: durable.Engine, run_id: str) -> list[tuple[str, bool]]:
    rows = await fetch(
        engine,
        "SELECT task, run_at <= now() AS due FROM durable.jobs WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    return [(r["task"], r["due"]) for r in rows]


@pytest.mark.parametrize(
    "new_nodes",
    [
        pytest.param(("a", "b"), id="removed-at-the-end"),
        pytest.param(("a", "wait", "c", "d"), id="appended"),
        pytest.param(("a", "wait_renamed", "c"), id="renamed-at-cursor"),
        pytest.param(("a", "inserted", "wait", "c"), id="inserted-before"),
        pytest.param(("wait", "c"), id="removed-before"),
        pytest.param(("a2", "wait", "c"), id="completed-node-renamed"),
    ],
)
async def test_a_changed_definition_never_touches_runs_pinned_to_the_old_shape(
    db: Any, new_nodes: tuple[str, ...], caplog: Any
) -> None:
    """A run is pinned at start to its workflow's shape (node names, kinds, branch keys). A
    worker with another definition of the same name never claims its jobs: the run waits,
    untouched, with its signal in the mailbox, while that worker serves its own runs; it
    says so at start. A worker with the old definition then finishes it exactly as
    declared."""
    log: list[str] = []
    old = versioned("change", "a", "wait", "c", log=log)
    new = versioned("change", *new_nodes, log=log)
    (run_id,) = await park(db, old)
    log.clear()
    async with running_engine(db, new) as engine:
        assert await engine.signal(run_id, "go", 1)
        assert await jobs_of(engine, run_id) == [("advance", True)]  # due, and older
        fresh = await engine.start("change", {})
        if any(n.startswith("wait") for n in new_nodes):
            assert await engine.signal(fresh, "go", 2)  # buffered for its wait
        await engine.wait(fresh, timeout=10)  # claims go oldest first: the old job was passed
        run = await engine.get_run(run_id, journal=True)
        assert await jobs_of(engine, run_id) == [("advance", True)]
    assert run.status is durable.RunStatus.WAITING
    assert [e.key for e in run.journal] == ["a"]
    assert not any(entry.startswith(run_id[-6:]) for entry in log), log
    assert any(
        "workflow 'change' version 1 changed shape" in r.getMessage()
        and "while 1 unfinished run(s) use the old one" in r.getMessage()
        for r in caplog.records
    )
    async with running_engine(db, old) as engine:
        assert await engine.wait(run_id, timeout=10) == {"a": "a done", "wait": 1, "c": "c done"}


def branchy(name: str, branches: dict[str, int], log: list[str]) -> durable.Workflow:
    """A workflow: step `a`, then parallel `p` whose branch `slow` fails its first attempt
    and retries after 1.5 s (so its job is in flight when the definition changes)."""
    wf = durable.Workflow(name)

    async def a(ctx: durable.Context) -> str:
        return "a done"

    def branch(key: str) -> Any:
        async def run(ctx: durable.Context) -> str:
            log.append(f"{key} attempt {ctx.attempt}")
            if key == "slow" and ctx.attempt == 1:
                raise RuntimeError("slow fails once")
            return f"{key} done"

        return run

    wf.step("a", a)
    wf.parallel("p", {k: branch(k) for k in branches}, backoff=1.5)
    return wf


async def test_a_branch_added_while_branches_are_in_flight_leaves_the_run_to_its_shape(
    db: Any,
) -> None:
    """A parallel node gains a branch while a run's branches are in flight: the new worker
    leaves that run alone (it is not stranded: its branch job waits for a worker of its
    shape), and an old worker completes it with the branches it started with."""
    log: list[str] = []
    old = branchy("fan", {"fast": 0, "slow": 0}, log)
    new = branchy("fan", {"fast": 0, "slow": 0, "added": 0}, log)
    async with running_engine(db, old) as engine:
        run_id = await engine.start("fan", {})

        async def slow_failed_once() -> bool:
            run = await engine.get_run(run_id, journal=True)
            return [a.key for a in run.attempts] == ["p#slow"] and "fast attempt 1" in log

        await eventually(slow_failed_once)
    async with open_engine(db, old) as engine:  # no worker: make the slow branch due now
        await execute(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)
    log.clear()
    async with running_engine(db, new) as engine:
        fresh = await engine.start("fan", {})
        assert set((await engine.wait(fresh, timeout=10))["p"]) == {"fast", "slow", "added"}
        assert await jobs_of(engine, run_id) == [("branch", True)]
        assert (await engine.get_run(run_id)).status is durable.RunStatus.RUNNING
    assert log.count("added attempt 1") == 1  # the fresh run's only
    async with running_engine(db, old) as engine:
        result = await engine.wait(run_id, timeout=10)
    assert result["p"] == {"fast": "fast done", "slow": "slow done"}


# -- configuration: schema names and DSN passwords -----------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        "Bad-Name",
        'x"; DROP SCHEMA durable CASCADE; --',
        "",
        "1starts_with_digit",
        "UPPER",
        "has space",
        "a" * 49,
        "durable\x00",
    ],
)
async def test_an_invalid_schema_name_raises_configuration_error_naming_it(
    seeded: Any, schema: str
) -> None:
    async with open_engine(seeded, seed_workflow()) as engine:
        before = await snapshot(engine)
        with pytest.raises(durable.ConfigurationError) as caught:
            durable.Engine(seeded.dsn, workflows=[seed_workflow()], schema=schema)
        assert str(caught.value).startswith(f"invalid schema name {schema!r}: "), caught.value
        with pytest.raises(durable.ConfigurationError, match="invalid schema name"):
            durable.Engine(pool=engine.pool, schema=schema)
        assert await snapshot(engine) == before
        schemas = await fetch(engine, "SELECT nspname FROM pg_namespace ORDER BY 1")
    assert "durable" in [r[0] for r in schemas]


async def test_the_cli_refuses_an_invalid_schema_name(seeded: Any) -> None:
    code, out, err = await cli("--dsn", seeded.dsn, "--schema", "Bad-Name", "runs", "list")
    assert code == 2
    assert out == ""
    assert "durable: error: invalid schema name 'Bad-Name'" in err
    async with open_engine(seeded, seed_workflow()) as engine:
        assert len(await engine.list_runs()) == 2


SECRET = "s3cr3t-Pa55w0rd-XyZ"


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{parts.username or 'postgres'}:{password}@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def secret_of(dsn: str) -> str:
    """The password to look for: the test DSN's own if it has one (password auth), else a
    made-up one (the throwaway server trusts loopback connections and ignores it)."""
    return urlsplit(dsn).password or SECRET


def everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


async def test_a_dsn_password_never_appears_in_logs_repr_or_errors(
    db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = secret_of(db.dsn)
    good = with_password(db.dsn, secret)
    unreachable = with_password(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", secret)
    as_param = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere?password={secret}"
    caplog.set_level(logging.DEBUG)

    texts: list[str] = []
    for dsn in (unreachable, as_param):
        engine = durable.Engine(dsn, workflows=[one_step()])
        texts.append(repr(engine))
        with pytest.raises(durable.DatabaseUnavailable) as caught:
            await engine.open()
        texts.append(everything_said(caught.value))
        assert "***" in str(caught.value)
        assert "cannot connect to postgresql://postgres" in str(caught.value)

    engine = durable.Engine(good, workflows=[one_step()])
    texts.append(repr(engine))
    assert "***" in repr(engine)
    async with engine, engine.worker(concurrency=2, poll_interval=0.05):
        run_id = await engine.start("order", {"n": 1})
        assert await engine.wait(run_id, timeout=10) == {"work": {"n": 1}}
        with pytest.raises(durable.RunNotFound) as missing:
            await engine.get_run("missing")
        texts.append(everything_said(missing.value))

    logged = caplog.text + "".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert caplog.records, "expected some DEBUG/INFO records to check"
    assert secret not in logged
    for text in texts:
        assert secret not in text, text


@pytest.mark.parametrize("form", ["url", "param"])
async def test_the_cli_never_prints_the_password_of_an_unreachable_database(form: str) -> None:
    port = free_port()
    dsn = (
        f"postgresql://app:{SECRET}@127.0.0.1:{port}/shop"
        if form == "url"
        else f"postgresql://app@127.0.0.1:{port}/shop?password={SECRET}"
    )
    for args in (
        ["runs", "list"],
        ["--log-level", "debug", "runs", "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        ["--json", "migrate"],
    ):
        code, out, err = await cli("--dsn", dsn, *args)
        assert code == 3, (args, out, err)
        assert SECRET not in out + err, (args, out, err)
        assert "durable: error:" in err
        assert "***" in err
