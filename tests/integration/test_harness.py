"""The testing harness (issue 16), used as a user would: the `durable_dsn` fixture of the
`durable.testing` plugin and `Harness`, nothing of this suite's own. A workflow that sleeps
a week, waits a day for a signal and retries with 10-minute backoffs completes in well
under 2 s of real time, with the same SQL as in production (the database clock shifted)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import durable
from durable.testing import Harness

WEEK, DAY = timedelta(days=7), timedelta(days=1)

trial = durable.Workflow("trial")
trial.sleep("trial_week", WEEK.total_seconds())
trial.wait_for_signal("upgrade", "upgraded", timeout=DAY.total_seconds(), default={"plan": "free"})


@trial.step(max_attempts=4, backoff=600)
async def bill(ctx: durable.Context) -> str:
    if ctx.attempt < 3:
        raise RuntimeError("the card network is down")
    plan: str = ctx.results["upgrade"]["plan"]
    return f"billed {ctx.input['customer']} for {plan} on attempt {ctx.attempt}"


async def status(h: Harness, run_id: str) -> tuple[str, str | None]:
    run = await h.engine.get_run(run_id)
    return run.status.value, run.current_node


async def test_a_week_a_day_and_two_backoffs_take_milliseconds(durable_dsn: str) -> None:
    started = time.monotonic()
    async with Harness(durable_dsn, workflows=[trial]) as h:
        t0 = await h.clock.now()
        run_id = await h.engine.start(trial, {"customer": "ada"})
        await h.run_until_idle()
        assert await status(h, run_id) == ("waiting", "trial_week")

        await h.clock.advance(WEEK - timedelta(minutes=1))
        await h.run_until_idle()
        assert await status(h, run_id) == ("waiting", "trial_week")  # not yet
        await h.clock.advance(timedelta(minutes=1))
        await h.run_until_idle()
        assert await status(h, run_id) == ("waiting", "upgrade")

        await h.clock.advance(DAY)  # no signal came: the wait's default
        await h.run_until_idle()
        run = await h.engine.get_run(run_id, journal=True)
        assert (run.status.value, run.current_node) == ("running", "bill")
        assert [a.attempt for a in run.attempts] == [1]

        await h.clock.advance(600)
        await h.run_until_idle()
        await h.clock.advance(600)
        await h.run_until_idle()
        assert await h.engine.wait(run_id, timeout=1) == {
            "trial_week": None,
            "upgrade": {"plan": "free"},
            "bill": "billed ada for free on attempt 3",
        }
        run = await h.engine.get_run(run_id, journal=True)
        elapsed = await h.clock.now() - t0
    took = time.monotonic() - started
    assert [a.attempt for a in run.attempts] == [1, 2]
    # The journal is stamped on the virtual clock: a week, a day, two backoffs.
    assert run.finished_at is not None
    assert run.finished_at - run.created_at >= WEEK + DAY + timedelta(minutes=20)
    assert elapsed >= WEEK + DAY + timedelta(minutes=20)
    assert elapsed < WEEK + DAY + timedelta(minutes=21)
    assert took < 2.0, f"took {took:.2f} s of real time"


async def test_a_signal_before_the_timeout_and_the_clock_between_harnesses(
    durable_dsn: str,
) -> None:
    async with Harness(durable_dsn, workflows=[trial]) as h:
        run_id = await h.engine.start(trial, {"customer": "bob"})
        await h.clock.advance(WEEK)  # the run reaches its sleep first, then a week passes
        await h.run_until_idle()
        assert await status(h, run_id) == ("waiting", "upgrade")
        assert await h.engine.signal(run_id, "upgraded", {"plan": "pro"})
        await h.run_until_idle()
        # Each backoff starts when its attempt fails: one advance per retry.
        await h.clock.advance(timedelta(minutes=10))
        await h.clock.advance(timedelta(minutes=10))
        await h.run_until_idle()
        result = await h.engine.wait(run_id, timeout=1)
        assert result["bill"] == "billed bob for pro on attempt 3"
        assert h.clock.offset == (WEEK + timedelta(minutes=20)).total_seconds()
        with pytest.raises(durable.ArgumentError):
            await h.clock.advance(-1)
    # A new harness starts from real time again.
    async with Harness(durable_dsn, workflows=[trial]) as h:
        assert abs((await h.clock.now()).timestamp() - time.time()) < 60


async def test_run_until_idle_gives_up_on_a_run_that_never_settles(durable_dsn: str) -> None:
    spin = durable.Workflow("spin")

    def forever(ctx: durable.SyncContext, i: int) -> bool:
        time.sleep(0.01)
        return True

    async def again(ctx: durable.LoopContext) -> int:
        return ctx.iteration

    spin.loop("spin", forever, again, max_iterations=10**6)
    async with Harness(durable_dsn, workflows=[spin]) as h:
        await h.engine.start(spin)
        with pytest.raises(TimeoutError, match=r"still busy after 0\.3 s"):
            await h.run_until_idle(timeout=0.3)
        cancelled = await h.engine.list_runs(workflow="spin")
        await h.engine.cancel(cancelled[0].id)
        await h.run_until_idle()
