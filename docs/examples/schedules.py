"""Cron schedules; docs/guides/flow-control.md shows these parts.

`main()` declares a nightly schedule, lists it, triggers a run now, pauses and resumes it,
against the PostgreSQL in `DURABLE_DSN`, and checks the outcomes.
"""

from __future__ import annotations

import asyncio
import os

import durable

# --8<-- [start:declare]
report = durable.Workflow("report")


@report.step
async def build(ctx: durable.Context) -> str:
    # `scheduled_at` is the tick, in the schedule's time zone: "2026-03-29T03:00:00+02:00".
    return f"{ctx.input['kind']} report for {ctx.input['scheduled_at'][:10]}"


def make_engine() -> durable.Engine:
    return durable.Engine(
        os.environ["DURABLE_DSN"],
        workflows=[report],
        schedules=[
            durable.Schedule(
                "nightly-report",
                cron="0 3 * * *",  # 03:00 every day...
                timezone="Europe/Paris",  # ...in Paris, summer time or not
                workflow="report",
                input={"kind": "daily"},
                overlap="skip",  # no second run while the last one is still going
                catch_up="latest",  # after an outage, one run for the missed nights
            ),
        ],
    )


# --8<-- [end:declare]


async def main() -> None:
    engine = make_engine()
    async with engine, engine.worker(concurrency=4, poll_interval=0.1):
        # --8<-- [start:operate]
        for s in await engine.schedules():
            print(f"{s.name}: {s.cron} ({s.timezone}), next tick {s.next_at:%Y-%m-%d %H:%M %Z}")

        run_id = await engine.trigger("nightly-report")  # a run now, as if a tick fell now
        assert run_id is not None  # None: overlap="skip" and the last run is still active
        print(await engine.wait(run_id, timeout=30))

        await engine.pause_schedule("nightly-report")  # ticks start nothing until resumed
        await engine.resume_schedule("nightly-report")  # from the next tick on
        # --8<-- [end:operate]
        (s,) = await engine.schedules()
        assert (s.last_run_id, s.last_run_status) == (run_id, durable.RunStatus.COMPLETED)
        assert s.next_at is not None
        assert s.next_at.minute == 0
    print("one run triggered; the schedule ticks next at 03:00 Paris time")


if __name__ == "__main__":
    asyncio.run(main())
