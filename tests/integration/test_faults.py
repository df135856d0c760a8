"""Faults (issue 7): a database outage under a running worker, and handlers that keep their
transaction open too long.

The outage runs against a dedicated `LocalPostgres` started here (not the shared session
server, which other tests use): the worker keeps running while PostgreSQL is stopped for
~3 s and started again, twice, and must pick up new work without a restart, finish the work
that was in flight, and log each outage once.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from helpers import eventually, fetch, fetchval, running_engine

import durable
from durable.errors import DurableError
from durable.server import LocalPostgres

OUTAGE_SECONDS = 3.0
OUTAGES = 2


# -- a database outage ---------------------------------------------------------------------


class Recorder(logging.Handler):
    """Keeps every record it sees (the scenario spans several tests, unlike `caplog`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class OutageReport:
    """What happened while the scenario ran."""

    records: list[logging.LogRecord] = field(default_factory=list)
    error: str | None = None  # the scenario's own failure (e.g. the worker died)
    during_outage: list[BaseException] = field(default_factory=list)  # start() while down
    after_outage: list[Any] = field(default_factory=list)  # results of runs started after
    recovery_seconds: list[float] = field(default_factory=list)
    slept_through: Any = None  # result of a run sleeping across the first outage
    in_flight: Any = None  # result of a run whose step was mid-transaction at the stop
    in_flight_calls: int = 0
    in_flight_effects: list[str] = field(default_factory=list)

    def durable_messages(self, text: str) -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.name.startswith("durable") and text in r.getMessage()
        ]


def outage_workflows(gate: anyio.Event, entered: anyio.Event, calls: list[int]) -> list[Any]:
    quick = durable.Workflow("quick")

    async def work(ctx: durable.Context) -> Any:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO effects VALUES ($1)", ctx.run_id)
        return ctx.input

    quick.step("work", work)

    sleeper = durable.Workflow("sleeper")

    async def after(ctx: durable.Context) -> str:
        return "woke after the outage"

    sleeper.sleep("nap", 4.0).step("after", after)

    held = durable.Workflow("held")

    async def hold(ctx: durable.Context) -> str:
        calls.append(ctx.attempt)
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO effects VALUES ($1)", f"held {ctx.run_id}")
        if len(calls) == 1:
            entered.set()
            await gate.wait()  # PostgreSQL stops while this transaction is open
        return "held done"

    held.step("hold", hold, backoff=0, max_attempts=5)
    return [quick, sleeper, held]


async def stop(server: LocalPostgres) -> None:
    await anyio.to_thread.run_sync(server.stop)


async def start(server: LocalPostgres) -> None:
    await anyio.to_thread.run_sync(server._start_server)


async def run_outages(server: LocalPostgres, report: OutageReport) -> None:
    gate, entered, calls = anyio.Event(), anyio.Event(), []
    engine = durable.Engine(server.dsn, workflows=outage_workflows(gate, entered, calls))
    async with engine:
        async with engine.pool.acquire() as conn:
            await conn.execute("CREATE TABLE effects (v text NOT NULL)")
        async with engine.worker(concurrency=4, poll_interval=0.2, grace_period=2):
            warm = await engine.start("quick", {"phase": "before"})
            assert await engine.wait(warm, timeout=10) == {"work": {"phase": "before"}}
            sleeper = await engine.start("sleeper")
            held: str | None = None
            for outage in range(OUTAGES):
                if outage == OUTAGES - 1:
                    held = await engine.start("held")
                    with anyio.fail_after(10):
                        await entered.wait()
                await stop(server)
                try:
                    with anyio.fail_after(10):
                        await engine.start("quick", {"phase": "during"})
                except Exception as exc:
                    report.during_outage.append(exc)
                if held is not None:
                    gate.set()  # the held handler returns; its commit cannot happen
                await anyio.sleep(OUTAGE_SECONDS)
                await start(server)
                began = time.monotonic()
                run_id = await engine.start("quick", {"phase": f"after {outage + 1}"})
                report.after_outage.append(await engine.wait(run_id, timeout=30))
                report.recovery_seconds.append(time.monotonic() - began)
            report.slept_through = await engine.wait(sleeper, timeout=30)
            assert held is not None
            report.in_flight = await engine.wait(held, timeout=30)
            report.in_flight_calls = len(calls)
            async with engine.pool.acquire() as conn:
                rows = await conn.fetch("SELECT v FROM effects WHERE v LIKE 'held %'")
            report.in_flight_effects = [r[0] for r in rows]


@pytest.fixture(scope="module")
async def outage() -> OutageReport:
    """Run the outage scenario once on a dedicated server; tests read its report."""
    try:
        server = LocalPostgres()
    except DurableError as exc:
        pytest.skip(f"no PostgreSQL binaries for a dedicated server: {exc}")
    report = OutageReport()
    recorder = Recorder()
    durable_logger = logging.getLogger("durable")
    old_level = durable_logger.level
    durable_logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(recorder)
    try:
        await anyio.to_thread.run_sync(server.start)
        with anyio.fail_after(120):
            await run_outages(server, report)
    except Exception as exc:
        report.error = "".join(traceback.format_exception(exc))
    finally:
        logging.getLogger().removeHandler(recorder)
        durable_logger.setLevel(old_level)
        report.records = recorder.records
        await anyio.to_thread.run_sync(server.cleanup)
    return report


async def test_the_worker_survives_a_database_outage_without_a_restart(
    outage: OutageReport,
) -> None:
    assert outage.error is None, outage.error
    # While the database is down, start() fails at once with a clear error.
    assert len(outage.during_outage) == OUTAGES
    for exc in outage.during_outage:
        assert isinstance(exc, durable.DatabaseUnavailable), repr(exc)
    # After each restart the same worker runs new work ...
    assert outage.after_outage == [{"work": {"phase": f"after {n + 1}"}} for n in range(OUTAGES)]
    assert all(s < 15 for s in outage.recovery_seconds), outage.recovery_seconds
    # ... a run that slept across the outage wakes and finishes ...
    assert outage.slept_through == {"nap": None, "after": "woke after the outage"}
    # ... and a step whose transaction was open when the server stopped ran again and
    # committed once.
    assert outage.in_flight == {"hold": "held done"}
    assert outage.in_flight_calls == 2
    assert len(outage.in_flight_effects) == 1


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    outage: OutageReport,
) -> None:
    assert outage.error is None, outage.error
    down = outage.durable_messages("database unavailable")
    up = outage.durable_messages("database reachable again")
    assert len(down) == OUTAGES, down
    assert len(up) == OUTAGES, up
    # Nothing else from durable at ERROR or above: connection errors are expected, not bugs.
    errors = [
        f"{r.name}: {r.getMessage()}"
        for r in outage.records
        if r.name.startswith("durable") and r.levelno >= logging.ERROR
    ]
    assert errors == []


# -- long transactions ---------------------------------------------------------------------

LIMIT = 0.5
LIMIT_ERROR = (
    "TimeoutError: attempt 1 of step 'stuck' ran longer than the transaction limit of 0.5 s "
    "(Engine(transaction_timeout=...)); long external calls belong in transactional=False "
    "steps"
)
SIDE = "CREATE TABLE side (v text NOT NULL)"


async def test_a_transactional_handler_over_the_limit_is_cut_off_and_retried(db: Any) -> None:
    settings: list[str] = []
    wf = durable.Workflow("slow")

    async def stuck(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", f"attempt {ctx.attempt}")
        settings.append(await ctx.conn.fetchval("SHOW idle_in_transaction_session_timeout"))
        if ctx.attempt == 1:
            # e.g. an HTTP call made inside the transaction: longer than the test's deadline,
            # so only the limit can end this attempt in time.
            await anyio.sleep(60)
        return "done"

    wf.step("stuck", stuck, backoff=0)
    async with running_engine(db, wf, setup=SIDE, transaction_timeout=LIMIT) as engine:
        run_id = await engine.start("slow")
        assert await engine.wait(run_id, timeout=10) == {"stuck": "done"}
        run = await engine.get_run(run_id, journal=True)
        side = [r[0] for r in await fetch(engine, "SELECT v FROM side")]
    assert [(a.key, a.attempt, a.error) for a in run.attempts] == [("stuck", 1, LIMIT_ERROR)]
    assert [(e.key, e.attempts) for e in run.journal] == [("stuck", 2)]
    assert side == ["attempt 2"]  # the cut-off attempt's writes rolled back
    # The server-side backstop for a handler that blocks the event loop: the session ends
    # after the limit + 30 s idle in a transaction.
    assert settings == ["30500ms", "30500ms"]


async def test_a_query_stuck_on_ctx_conn_is_cancelled_at_the_limit(db: Any) -> None:
    wf = durable.Workflow("slow_query")

    async def stuck(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", f"attempt {ctx.attempt}")
        if ctx.attempt == 1:
            await ctx.conn.execute("SELECT pg_sleep(30)")
        return "done"

    wf.step("stuck", stuck, backoff=0)
    async with running_engine(db, wf, setup=SIDE, transaction_timeout=LIMIT) as engine:
        run_id = await engine.start("slow_query")
        assert await engine.wait(run_id, timeout=10) == {"stuck": "done"}
        run = await engine.get_run(run_id, journal=True)
        side = [r[0] for r in await fetch(engine, "SELECT v FROM side")]

        async def no_sleeping_backend() -> bool:
            return (
                await fetchval(
                    engine,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query = 'SELECT pg_sleep(30)'",
                )
                == 0
            )

        # The statement itself was cancelled on the server, not left running.
        await eventually(no_sleeping_backend, timeout=3)
    assert [(a.key, a.attempt, a.error) for a in run.attempts] == [("stuck", 1, LIMIT_ERROR)]
    assert side == ["attempt 2"]


async def test_a_handler_always_over_the_limit_fails_the_run_and_compensates(db: Any) -> None:
    wf = durable.Workflow("always_slow")

    async def before(ctx: durable.Context) -> str:
        return "before done"

    async def undo(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ('undone')")

    async def stuck(ctx: durable.Context) -> None:
        await anyio.sleep(5)

    wf.step("before", before, compensate=undo).step("stuck", stuck, max_attempts=2, backoff=0)
    async with running_engine(db, wf, setup=SIDE, transaction_timeout=LIMIT) as engine:
        run_id = await engine.start("always_slow")
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
        side = [r[0] for r in await fetch(engine, "SELECT v FROM side")]
    run = failed.value.run
    assert run.error == LIMIT_ERROR.replace("attempt 1", "attempt 2")
    assert side == ["undone"]


async def test_a_step_timeout_above_the_limit_is_capped_by_the_limit(db: Any) -> None:
    wf = durable.Workflow("capped")

    async def stuck(ctx: durable.Context) -> str:
        if ctx.attempt == 1:
            await anyio.sleep(5)
        return "done"

    wf.step("stuck", stuck, timeout=10, backoff=0)
    async with running_engine(db, wf, transaction_timeout=LIMIT) as engine:
        run_id = await engine.start("capped")
        assert await engine.wait(run_id, timeout=10) == {"stuck": "done"}
        run = await engine.get_run(run_id, journal=True)
    # Uncapped, the first attempt would have slept its 5 s and succeeded (its timeout is
    # 10 s): it failed at the limit instead.
    assert [a.error for a in run.attempts] == [LIMIT_ERROR]


async def test_a_non_transactional_step_is_not_subject_to_the_limit(db: Any) -> None:
    engines: list[durable.Engine] = []
    held_open: list[int] = []
    wf = durable.Workflow("external")

    async def call_out(ctx: durable.Context) -> str:
        assert ctx.conn is None
        await anyio.sleep(1.5)  # three times the transaction limit
        # No transaction of this database has been open for a second or more meanwhile.
        held_open.append(
            await fetchval(
                engines[0],
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND xact_start < now() - interval '1 second'",
            )
        )
        return f"answered on attempt {ctx.attempt}"

    wf.step("call_out", call_out, transactional=False, backoff=0)
    async with running_engine(db, wf, transaction_timeout=LIMIT) as engine:
        engines.append(engine)
        run_id = await engine.start("external")
        assert await engine.wait(run_id, timeout=10) == {"call_out": "answered on attempt 1"}
        run = await engine.get_run(run_id, journal=True)
    assert run.attempts == ()
    assert held_open == [0]


@pytest.mark.parametrize("bad", [0, -1, -0.5])
def test_the_transaction_limit_must_be_positive(bad: float) -> None:
    with pytest.raises(durable.ConfigurationError, match="transaction_timeout must be > 0"):
        durable.Engine("postgresql://localhost/x", transaction_timeout=bad)
