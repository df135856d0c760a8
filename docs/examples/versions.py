"""Versions side by side, `check` as a deploy gate, and `upgrade`.

    DURABLE_DSN=postgresql://... python docs/examples/versions.py

Version 2 of `order` appends a `receipt` step. A run started on version 1 before the
deploy keeps running on version 1's code while new runs start on version 2. The next
release, which registers version 2 alone, fails `check` until that run is finished or
moved to version 2 with `upgrade`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import durable

DSN = os.environ.get("DURABLE_DSN", "postgresql://localhost/app")

# --8<-- [start:versions]
order_v1 = durable.Workflow("order", version=1)


@order_v1.step
async def charge(ctx: durable.Context) -> dict[str, Any]:
    return {"charged": ctx.input["amount"]}


order_v1.wait_for_signal("shipped", "shipped")

# Version 2 appends a step. Both versions are registered: runs of version 1 finish on
# version 1's code, new runs start on version 2 (the highest registered).
order_v2 = durable.Workflow("order", version=2)
order_v2.step("charge", charge)
order_v2.wait_for_signal("shipped", "shipped")


@order_v2.step
async def receipt(ctx: durable.Context) -> str:
    return f"receipt for {ctx.results['charge']['charged']}"


engine = durable.Engine(DSN, workflows=[order_v1, order_v2])
# --8<-- [end:versions]


async def until_waiting(run_ids: list[str]) -> None:
    """Poll until every run is parked on its wait (a worker ran `charge`)."""
    for _ in range(600):
        if {(await engine.get_run(r)).status for r in run_ids} == {durable.RunStatus.WAITING}:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the runs did not reach their wait")


async def main() -> None:
    async with engine, engine.worker():
        old = await engine.start("order", {"amount": 5}, version=1)  # from before the deploy
        new = await engine.start("order", {"amount": 7})  # version 2
        await until_waiting([old, new])
        print("versions:", (await engine.get_run(old)).version, (await engine.get_run(new)).version)

        # --8<-- [start:check]
        # The next release registers version 2 alone: may it go out?
        next_release = durable.Engine(DSN, workflows=[order_v2])
        async with next_release:
            report = await next_release.check()
            print("ok to deploy:", report.ok)  # False: a run of version 1 is unfinished
            for group in report.stranded:
                print(f"  {group.cause}: {group.workflow} v{group.version}: {group.run_ids}")
            # --8<-- [end:check]
            assert not report.ok
            assert report.stranded[0].run_ids == (old,)

            # --8<-- [start:upgrade]
            # The old run's journal fits version 2 (charge, then the wait it is parked at),
            # so it can move: it will run `receipt` too.
            moved = await next_release.upgrade("order", from_version=1, to_version=2)
            print("moved:", moved.moved, "refused:", moved.refused)
            print("ok to deploy now:", (await next_release.check()).ok)
            # --8<-- [end:upgrade]
            assert moved.moved == (old,)

        for run_id in (old, new):
            await engine.signal(run_id, "shipped", {"carrier": "ups"})
            result = await engine.wait(run_id, timeout=30)
            print(run_id, result["receipt"])
            assert result["receipt"].startswith("receipt for")


if __name__ == "__main__":
    asyncio.run(main())
