"""wait_for_signal and Engine.signal: the per-run mailbox, oldest first, one signal per wait,
prompt wake-ups, timeouts with and without a default, and the signal/timeout race
(SPEC, Semantics: wait_for_signal; seed defect 4)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import anyio
import pytest
from helpers import eventually, fetch, fetchval, open_engine, running_engine, until_blocked

import durable
from durable.cli import timeline_lines

COMP_TABLE = "CREATE TABLE comp (key text NOT NULL)"


async def _status(engine: durable.Engine, run_id: str) -> str:
    return (await engine.get_run(run_id)).status.value


async def _until_waiting(engine: durable.Engine, run_id: str, node: str) -> None:
    async def check() -> bool:
        run = await engine.get_run(run_id)
        return run.status is durable.RunStatus.WAITING and run.current_node == node

    await eventually(check, timeout=10)


async def _mailbox(engine: durable.Engine, run_id: str) -> list[tuple[str, Any, str | None]]:
    """(name, payload, consumed_by) of every signal of the run, oldest first."""
    rows = await fetch(
        engine,
        "SELECT name, payload::text AS payload, consumed_by, consumed_at IS NULL AS fresh "
        "FROM durable.signals WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    for r in rows:
        assert r["fresh"] == (r["consumed_by"] is None)

    return [(r["name"], json.loads(r["payload"]), r["consumed_by"]) for r in rows]


async def _no_jobs(engine: durable.Engine) -> bool:
    return bool(await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0)


def _two_waits() -> durable.Workflow:
    wf = durable.Workflow("twice")
    wf.wait_for_signal("first", "go")

    @wf.step
    async def between(ctx: durable.Context) -> Any:
        return ctx.results["first"]

    wf.wait_for_signal("second", "go")
    return wf


async def test_signals_sent_before_the_wait_are_buffered_and_consumed_oldest_first(
    db: Any,
) -> None:
    wf = _two_waits()
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        # No worker yet: the run has not reached either wait.
        assert await engine.signal(run_id, "go", {"n": 1}) is True
        assert await engine.signal(run_id, "go", {"n": 2}) is True
        assert await engine.signal(run_id, "go", {"n": 3}) is True
        with pytest.raises(durable.ArgumentError, match="'other'"):
            await engine.signal(run_id, "other", "x")  # no wait of the workflow takes it
        assert await _status(engine, run_id) == "pending"
        async with engine.worker(concurrency=2, poll_interval=0.05):
            result = await engine.wait(run_id, timeout=10)
        mailbox = await _mailbox(engine, run_id)

    assert result == {"first": {"n": 1}, "between": {"n": 1}, "second": {"n": 2}}
    assert mailbox == [
        ("go", {"n": 1}, "first"),
        ("go", {"n": 2}, "second"),
        ("go", {"n": 3}, None),  # a duplicate does not satisfy any later wait
    ]


async def test_a_second_signal_waits_in_the_mailbox_for_the_next_wait(db: Any) -> None:
    wf = durable.Workflow("once")
    wf.wait_for_signal("approval", "approved")
    # A parked pause between the two waits (a step in flight would hold the run's locks,
    # and signal() waits for an in-flight handler to commit).
    wf.sleep("pause", 0.8)
    wf.wait_for_signal("again", "approved")

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "approval")
        assert await engine.signal(run_id, "approved", "one") is True
        assert await engine.signal(run_id, "approved", "two") is True
        await _until_waiting(engine, run_id, "pause")
        # The first wait took the oldest signal; the second one stays unconsumed.
        mailbox = await _mailbox(engine, run_id)
        assert mailbox == [("approved", "one", "approval"), ("approved", "two", None)]
        fresh = await fetchval(
            engine,
            "SELECT count(*) FROM durable.signals WHERE run_id = $1 AND consumed_at IS NULL",
            run_id,
        )
        assert fresh == 1
        result = await engine.wait(run_id, timeout=10)
        mailbox = await _mailbox(engine, run_id)

    assert result == {"approval": "one", "pause": None, "again": "two"}
    assert mailbox == [("approved", "one", "approval"), ("approved", "two", "again")]


async def test_signal_to_a_finished_run_returns_false_and_unknown_id_raises(db: Any) -> None:
    done = durable.Workflow("done")

    @done.step
    async def only(ctx: durable.Context) -> int:
        return 1

    failing = durable.Workflow("failing")

    @failing.step
    async def boom(ctx: durable.Context) -> None:
        raise durable.NonRetryable("no")

    parked = durable.Workflow("parked")
    parked.wait_for_signal("w", "go")

    async with running_engine(db, done, failing, parked) as engine:
        completed = await engine.start(done)
        await engine.wait(completed, timeout=10)
        failed = await engine.start(failing)
        with pytest.raises(durable.RunFailed):
            await engine.wait(failed, timeout=10)
        cancelled = await engine.start(parked)
        await _until_waiting(engine, cancelled, "w")
        assert await engine.cancel(cancelled) is True
        with pytest.raises(durable.RunCancelled):
            await engine.wait(cancelled, timeout=10)

        for run_id in (completed, failed, cancelled):
            assert await engine.signal(run_id, "go", {"late": True}) is False
        assert await fetchval(engine, "SELECT count(*) FROM durable.signals") == 0

        with pytest.raises(durable.RunNotFound):
            await engine.signal("01ARZ3NDEKTSV4RRFFQ69G5FAV", "go", 1)
        assert await fetchval(engine, "SELECT count(*) FROM durable.signals") == 0


async def test_signal_in_a_rolled_back_caller_transaction_records_nothing(db: Any) -> None:
    wf = durable.Workflow("txsig")
    wf.wait_for_signal("w", "go")

    class Abort(Exception):
        pass

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "w")
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0

        async def signal_then_abort() -> None:
            async with engine.pool.acquire() as conn, conn.transaction():
                assert await engine.signal(run_id, "go", "nope", conn=conn) is True
                # Inside the caller's transaction the signal and the wake-up exist...
                assert await conn.fetchval("SELECT count(*) FROM durable.signals") == 1
                raise Abort

        with pytest.raises(Abort):
            await signal_then_abort()
        # ...and roll back with it: nothing recorded, no job, the run keeps waiting. Not a
        # matter of time: a worker moves a run only through a job, and there is none.
        assert await fetchval(engine, "SELECT count(*) FROM durable.signals") == 0
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0
        assert await _status(engine, run_id) == "waiting"

        async with engine.pool.acquire() as conn, conn.transaction():
            assert await engine.signal(run_id, "go", "yes", conn=conn) is True
        result = await engine.wait(run_id, timeout=10)

    assert result == {"w": "yes"}


async def test_a_waiting_run_is_woken_promptly_by_the_signal(db: Any) -> None:
    wf = durable.Workflow("prompt")
    wf.wait_for_signal("w", "go")

    @wf.step
    async def after(ctx: durable.Context) -> Any:
        return ctx.results["w"]

    # The worker polls once an hour: only the signal's own transaction (its job's NOTIFY)
    # can wake the run within the deadline.
    async with running_engine(db, wf, poll_interval=3600.0) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "w")
        assert await engine.signal(run_id, "go", {"by": "ann"}) is True
        result = await engine.wait(run_id, timeout=30)

    assert result == {"w": {"by": "ann"}, "after": {"by": "ann"}}


async def test_a_signal_of_another_name_does_not_wake_the_wait(db: Any) -> None:
    wf = durable.Workflow("names")
    wf.wait_for_signal("w", lambda ctx: f"approve-{ctx.input['order']}")

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf, {"order": 7})
        await _until_waiting(engine, run_id, "w")
        assert await fetchval(
            engine, "SELECT waiting_for FROM durable.runs WHERE id = $1", run_id
        ) == ("approve-7")
        assert await engine.signal(run_id, "approve-8", "wrong") is True
        # No job, so no worker can move the run: it keeps waiting, however long we look.
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0
        assert await _status(engine, run_id) == "waiting"
        assert await engine.signal(run_id, "approve-7", "right") is True
        result = await engine.wait(run_id, timeout=10)
        mailbox = await _mailbox(engine, run_id)

    assert result == {"w": "right"}
    assert mailbox == [("approve-8", "wrong", None), ("approve-7", "right", "w")]


async def test_timeout_with_a_default_completes_with_the_default(db: Any) -> None:
    wf = durable.Workflow("dflt")
    wf.wait_for_signal("w", "go", timeout=0.3, default={"answer": "default"})
    wf.wait_for_signal("w_none", "go2", timeout=0.2, default=None)

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "w")
        wake_at = await fetchval(engine, "SELECT wake_at FROM durable.runs WHERE id = $1", run_id)
        job_at = await fetchval(engine, "SELECT run_at FROM durable.jobs WHERE run_id = $1", run_id)
        assert wake_at is not None
        assert job_at == wake_at
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert result == {"w": {"answer": "default"}, "w_none": None}
    w = next(e for e in run.journal if e.key == "w")
    assert w.finished_at >= wake_at
    assert [(e.key, e.status) for e in run.journal] == [
        ("w", "completed"),
        ("w_none", "completed"),
    ]
    # The journal says the wait timed out and took its default (`durable runs show` too).
    assert [e.error for e in run.journal] == ["timed out (default used)"] * 2
    assert any("w " in line and "timed out (default used)" in line for line in timeline_lines(run))


async def test_timeout_without_a_default_fails_the_node_and_compensates(db: Any) -> None:
    async def release(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO comp VALUES ($1)", ctx.node)

    wf = durable.Workflow("nodflt")

    @wf.step(compensate=release)
    async def reserve(ctx: durable.Context) -> str:
        return "r"

    wf.wait_for_signal("approval", "approved", timeout=0.3)

    @wf.step
    async def ship(ctx: durable.Context) -> None:
        raise AssertionError("must not run")

    async with running_engine(db, wf, setup=COMP_TABLE, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        run = await engine.get_run(run_id, journal=True)
        # A signal after the run failed is refused.
        assert await engine.signal(run_id, "approved", 1) is False

    assert "approved" in (info.value.run.error or "")
    assert "0.3" in (run.error or "")
    assert [(e.key, e.status) for e in run.journal] == [
        ("reserve", "completed"),
        ("approval", "failed"),
        ("reserve@compensate", "completed"),
    ]
    assert comp == ["reserve@compensate"]


async def test_a_non_json_payload_raises_and_writes_nothing(db: Any) -> None:
    wf = durable.Workflow("badpayload")
    wf.wait_for_signal("w", "go")

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "w")
        for bad in (object(), {1, 2}, float("nan"), {"k": b"bytes"}):
            with pytest.raises(durable.SerializationError):
                await engine.signal(run_id, "go", bad)
        with pytest.raises(durable.SerializationError):
            await engine.signal("no-such-run", "go", object())
        assert await fetchval(engine, "SELECT count(*) FROM durable.signals") == 0
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0
        assert await _status(engine, run_id) == "waiting"
        assert await engine.signal(run_id, "go", None) is True
        assert await engine.wait(run_id, timeout=10) == {"w": None}


async def test_an_early_timeout_job_reparks_until_the_stored_timeout(db: Any) -> None:
    wf = durable.Workflow("early")
    wf.wait_for_signal("w", "go", timeout=2.0, default="late")

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        await _until_waiting(engine, run_id, "w")
        wake_at = await fetchval(engine, "SELECT wake_at FROM durable.runs WHERE id = $1", run_id)
        await fetchval(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)

        async def reparked() -> bool:
            job_at = await fetchval(
                engine, "SELECT run_at FROM durable.jobs WHERE run_id = $1", run_id
            )
            return bool(job_at == wake_at)

        await eventually(reparked, timeout=5)
        run = await engine.get_run(run_id, journal=True)
        assert run.status is durable.RunStatus.WAITING
        assert run.journal == ()
        assert await fetchval(
            engine,
            "SELECT (wake_at, waiting_for) = ($2, 'go') FROM durable.runs WHERE id = $1",
            run_id,
            wake_at,
        )
        assert await engine.signal(run_id, "go", "in time") is True
        assert await engine.wait(run_id, timeout=5) == {"w": "in time"}


async def test_a_non_json_default_is_refused_or_fails_the_node(db: Any) -> None:
    wf = durable.Workflow("baddefault")
    try:
        wf.wait_for_signal("w", "go", timeout=0.1, default={1, 2})
    except durable.DefinitionError:
        return  # refused up front: fine
    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=2)
    assert "JSON" in (info.value.run.error or "")


async def test_concurrent_signals_to_one_parked_run_are_all_recorded(db: Any) -> None:
    wf = _two_waits()
    runs, per_run = 60, 6
    async with running_engine(db, wf, concurrency=8, poll_interval=0.05, pool_size=40) as engine:
        run_ids = [await engine.start(wf) for _ in range(runs)]

        async def all_parked() -> bool:
            n = await fetchval(engine, "SELECT count(*) FROM durable.runs WHERE status = 'waiting'")
            return bool(n == runs)

        await eventually(all_parked, timeout=15)
        errors: list[str] = []

        async def send(run_id: str, k: int) -> bool | None:
            try:
                return await engine.signal(run_id, "go", k)
            except Exception as exc:
                errors.append(repr(exc))
                return None

        accepted = await asyncio.gather(*(send(r, k) for r in run_ids for k in range(per_run)))
        assert errors == []
        for run_id in run_ids:
            await engine.wait(run_id, timeout=15)
        rows = await fetch(
            engine,
            "SELECT run_id, count(*) AS n, count(consumed_at) AS consumed "
            "FROM durable.signals GROUP BY 1",
        )
        # Stale duplicate wake-ups, if any, are claimed and dropped.
        await eventually(lambda: _no_jobs(engine), timeout=5)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    # A signal is refused only once its run has finished (both waits satisfied): every
    # accepted signal is in the mailbox, and each run consumed exactly two of them.
    sent = dict.fromkeys(run_ids, 0)
    for (run_id, _k), ok in zip(
        ((r, k) for r in run_ids for k in range(per_run)), accepted, strict=True
    ):
        assert ok is not None
        sent[run_id] += int(ok)
    assert {r["run_id"]: (r["n"], r["consumed"]) for r in rows} == {
        run_id: (n, 2) for run_id, n in sent.items()
    }
    assert all(n >= 2 for n in sent.values())
    assert jobs == 0


RACE_RUNS = 500
RACE_TIMEOUT = 0.5
RACE_JITTER = 0.06
# Runs are started at this pace so the workers keep up and every timeout fires on time:
# a saturated worker would make the outcome depend on its backlog, not on the race.
RACE_STARTS_PER_SECOND = 250


async def test_signal_and_timeout_race_exactly_one_wins(db: Any) -> None:
    """500 runs wait with timeout=0.5 s and default='timeout'; each gets its signal at about
    its stored timeout moment. Every run ends with exactly one outcome: the payload (its
    signal consumed) or 'timeout' (its signal refused or left unconsumed), never both."""
    wf = durable.Workflow("race")
    wf.wait_for_signal("w", "go", timeout=RACE_TIMEOUT, default="timeout")

    sent: dict[str, bool] = {}
    run_ids: list[str] = []
    rng = random.Random()

    async with open_engine(db, wf, pool_size=30) as engine:
        async with engine.pool.acquire() as conn:
            offset = (await conn.fetchval("SELECT clock_timestamp()")).timestamp() - time.time()

        async def start_all() -> None:
            t0 = time.monotonic()
            for i in range(RACE_RUNS):
                await asyncio.sleep(max(0.0, t0 + i / RACE_STARTS_PER_SECOND - time.monotonic()))
                run_ids.append(await engine.start(wf, {"i": i}))

        async def send(run_id: str, at: float | None) -> None:
            if at is not None:
                await asyncio.sleep(max(0.0, at - time.time()))
            sent[run_id] = await engine.signal(run_id, "go", {"run": run_id})

        async with (
            engine.worker(concurrency=8, poll_interval=0.05),
            engine.worker(concurrency=8, poll_interval=0.05),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(start_all)
            scheduled: set[str] = set()
            deadline = time.monotonic() + 30
            # Schedule each run's signal at its stored timeout moment, give or take jitter.
            while len(scheduled) < RACE_RUNS:
                assert time.monotonic() < deadline, "runs did not park in time"
                rows = await fetch(
                    engine,
                    "SELECT id, status, wake_at FROM durable.runs "
                    "WHERE id <> ALL($1::text[]) AND (wake_at IS NOT NULL "
                    "OR status IN ('completed', 'failed', 'cancelled'))",
                    list(scheduled),
                )
                for r in rows:
                    scheduled.add(r["id"])
                    if r["wake_at"] is None:  # already timed out before we saw it
                        tg.start_soon(send, r["id"], None)
                        continue
                    at = r["wake_at"].timestamp() - offset
                    tg.start_soon(send, r["id"], at + rng.uniform(-RACE_JITTER, RACE_JITTER))
                await asyncio.sleep(0.01)

            async def all_done() -> bool:
                n = await fetchval(
                    engine, "SELECT count(*) FROM durable.runs WHERE status = 'completed'"
                )
                return bool(n == RACE_RUNS and len(sent) == RACE_RUNS)

            await eventually(all_done, timeout=30, interval=0.05)

        rows = await fetch(
            engine,
            "SELECT r.id, r.status, r.result->'w' AS w, "
            "(SELECT count(*) FROM durable.journal j WHERE j.run_id = r.id) AS journaled, "
            "(SELECT count(*) FROM durable.signals s WHERE s.run_id = r.id) AS signals, "
            "(SELECT count(*) FROM durable.signals s WHERE s.run_id = r.id "
            "   AND s.consumed_at IS NOT NULL) AS consumed "
            "FROM durable.runs r",
        )
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    assert len(rows) == RACE_RUNS
    assert set(sent) == set(run_ids)
    outcomes: Counter[str] = Counter()
    bad = []
    for r in rows:
        w = json.loads(r["w"])
        won_by_signal = w == {"run": r["id"]}
        outcome = "signal" if won_by_signal else "timeout" if w == "timeout" else "other"
        outcomes[outcome] += 1
        ok = (
            r["status"] == "completed"
            and r["journaled"] == 1
            # A signal is in the mailbox iff signal() returned True...
            and r["signals"] == (1 if sent[r["id"]] else 0)
            # ...and it is consumed iff the payload is the node's result.
            and r["consumed"] == (1 if won_by_signal else 0)
            and outcome != "other"
        )
        if not ok:
            bad.append((dict(r), sent[r["id"]]))
    assert bad == [], bad[:5]
    consumed = sum(r["consumed"] for r in rows)
    assert consumed == outcomes["signal"]
    refused = sum(1 for v in sent.values() if not v)
    print(f"\nrace: {dict(outcomes)}; signal() returned False {refused} times")
    # Both outcomes happened, so the race was really run.
    assert outcomes["signal"] >= 10, outcomes
    assert outcomes["timeout"] >= 10, outcomes
    assert jobs == 0


# -- dedupe keys (issue 16) ----------------------------------------------------------------


async def test_a_duplicate_signal_is_recorded_once(db: Any) -> None:
    """A webhook delivered twice, before and after its wait consumed it: one signal."""
    wf = _two_waits()
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.signal(run_id, "go", {"n": 1}, dedupe_key="evt_1") is True
        assert await engine.signal(run_id, "go", {"n": 1}, dedupe_key="evt_1") is True
        assert await _mailbox(engine, run_id) == [("go", {"n": 1}, None)]
        async with engine.worker(concurrency=2, poll_interval=0.05):
            await _until_waiting(engine, run_id, "second")
            # Consumed by the first wait, the key still stands: the second wait gets none.
            assert await engine.signal(run_id, "go", {"n": 1}, dedupe_key="evt_1") is True
            assert await _mailbox(engine, run_id) == [("go", {"n": 1}, "first")]
            # Another key (or none) is another signal.
            assert await engine.signal(run_id, "go", {"n": 2}, dedupe_key="evt_2") is True
            result = await engine.wait(run_id, timeout=10)
        mailbox = await _mailbox(engine, run_id)
        keys = await fetch(
            engine, "SELECT dedupe_key FROM durable.signals WHERE run_id = $1 ORDER BY id", run_id
        )
    assert result == {"first": {"n": 1}, "between": {"n": 1}, "second": {"n": 2}}
    assert mailbox == [("go", {"n": 1}, "first"), ("go", {"n": 2}, "second")]
    assert [r["dedupe_key"] for r in keys] == ["evt_1", "evt_2"]


async def test_dedupe_keys_are_per_run_and_concurrent_duplicates_record_one(db: Any) -> None:
    wf = durable.Workflow("dedupe_race")
    wf.wait_for_signal("paid", "paid")
    async with open_engine(db, wf) as engine:
        a, b = await engine.start(wf), await engine.start(wf)
        answers: list[bool] = []

        async def send(run_id: str) -> None:
            answers.append(await engine.signal(run_id, "paid", None, dedupe_key="evt"))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(send, a)
            tg.start_soon(send, b)
        counts = {
            run_id: await fetchval(
                engine, "SELECT count(*) FROM durable.signals WHERE run_id = $1", run_id
            )
            for run_id in (a, b)
        }
        with pytest.raises(durable.ArgumentError, match="dedupe_key"):
            await engine.signal(a, "paid", None, dedupe_key="")
    assert answers == [True] * 6
    assert counts == {a: 1, b: 1}


async def test_a_retried_signal_gets_the_first_answer_after_its_run_finished(db: Any) -> None:
    """A client whose request signalled the run, then retries it (same dedupe key) after the
    run consumed the signal and finished, is told True again, not that the run finished:
    the retry's answer must not depend on how fast the run went on."""
    wf = durable.Workflow("answered")
    wf.wait_for_signal("decision", "decided")
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.signal(run_id, "decided", {"ok": True}, dedupe_key="req-1") is True
        await engine.wait(run_id, timeout=10)
        assert await engine.signal(run_id, "decided", {"ok": True}, dedupe_key="req-1") is True
        # A new request (another key, or none) reaches a finished run: no wait will take it.
        assert await engine.signal(run_id, "decided", {"ok": False}, dedupe_key="req-2") is False
        assert await engine.signal(run_id, "decided", {"ok": False}) is False
        assert await _mailbox(engine, run_id) == [("decided", {"ok": True}, "decision")]


async def test_a_handler_signalling_its_own_run_with_a_dedupe_key_records_once(db: Any) -> None:
    wf = durable.Workflow("self_dedupe")
    engine_box: list[durable.Engine] = []

    @wf.step
    async def notify(ctx: durable.Context) -> None:
        for _ in range(2):
            await engine_box[0].signal(ctx.run_id, "done", "me", dedupe_key="once", conn=ctx.conn)

    wf.wait_for_signal("done", "done")
    wf.wait_for_signal("again", "done", timeout=0.3, default="none")
    async with running_engine(db, wf) as engine:
        engine_box.append(engine)
        result = await engine.wait(await engine.start(wf), timeout=10)
    assert result == {"notify": None, "done": "me", "again": "none"}


async def test_a_timeout_counts_from_when_the_claim_got_the_run_not_from_before_its_lock(
    db: Any,
) -> None:
    """A claim that waits for the run's row lock (a client transaction holds it) reads the
    clock again once it has the run: the wait's deadline counts from then, so the timeout
    never fires early by the time the claim spent waiting."""
    wf = durable.Workflow("locked_out")
    wf.wait_for_signal("w", "never", timeout=30, default=None)
    async with open_engine(db, wf) as engine:
        run_id = await engine.start("locked_out", {})
        async with engine.pool.acquire() as holder:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM durable.runs WHERE id = $1 FOR NO KEY UPDATE", run_id
            )
            async with engine.worker(concurrency=1, poll_interval=0.05):
                await until_blocked(engine, "claim_v1")
                await anyio.sleep(0.5)  # the gap the clock must not lose, not a synchronisation
                released = await holder.fetchval("SELECT clock_timestamp()")
                await tx.commit()
                await _until_waiting(engine, run_id, "w")
                wake_at = await fetchval(
                    engine, "SELECT wake_at FROM durable.runs WHERE id = $1", run_id
                )
        assert wake_at >= released + timedelta(seconds=30)


async def test_signal_v1_of_an_older_release_still_records_and_wakes(db: Any) -> None:
    """Workers and clients of the previous release call signal_v1 during a rolling deploy."""
    async with running_engine(db, _two_waits()) as engine:
        run_id = await engine.start("twice", {})
        await _until_waiting(engine, run_id, "first")
        assert await fetchval(engine, "SELECT durable.signal_v1($1, 'go', '1')", run_id) is True
        await _until_waiting(engine, run_id, "second")
        assert await fetchval(engine, "SELECT durable.signal_v1('nope', 'go', '1')") is None
        assert (await _mailbox(engine, run_id))[0] == ("go", 1, "first")
