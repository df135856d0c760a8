"""Flow control; docs/guides/flow-control.md shows these parts.

`main()` runs them against the PostgreSQL in `DURABLE_DSN` and checks the outcomes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import durable

# --8<-- [start:concurrency]
# One sync per account at a time; other accounts' syncs run side by side.
sync = durable.Workflow(
    "sync_account", concurrency=1, concurrency_key=lambda input: input["account"]
)


@sync.step
async def pull(ctx: durable.Context) -> int:
    return len(ctx.input["account"])


# --8<-- [end:concurrency]

# --8<-- [start:limits]
limits = {
    # At most 100 calls in any second and 20 at once, shared by every worker and process.
    "stripe": durable.Limit(rate=100, per=1.0, concurrency=20),
    # At most 2 mails a second per recipient domain.
    "mail": durable.Limit(rate=2, per=1.0),
}

billing = durable.Workflow("billing")


@billing.step(limit="stripe", max_attempts=5)
async def charge(ctx: durable.Context) -> str:
    return f"charged {ctx.input['amount']}"


@billing.step(limit="mail", limit_key=lambda ctx: ctx.input["email"].split("@")[1])
async def receipt(ctx: durable.Context) -> str:
    return f"mailed {ctx.input['email']}"


# --8<-- [end:limits]

reindex = durable.Workflow("reindex")


@reindex.step
async def build(ctx: durable.Context) -> Any:
    return ctx.input["reason"]


async def flow_control_calls(engine: durable.Engine) -> dict[str, str]:
    ids = {}
    # --8<-- [start:priority]
    ids["urgent"] = await engine.start("billing", {"amount": 5, "email": "a@x.org"}, priority=50)
    # --8<-- [end:priority]
    # --8<-- [start:delay]
    ids["later"] = await engine.start("reindex", {"reason": "nightly"}, delay=0.5)
    # --8<-- [end:delay]
    # --8<-- [start:singleton]
    first = await engine.start("reindex", {"reason": "full"}, singleton_key="shop-7")
    again = await engine.start("reindex", {"reason": "full"}, singleton_key="shop-7")
    assert again == first  # while the first is active
    # --8<-- [end:singleton]
    ids["singleton"] = first
    # --8<-- [start:debounce]
    window = durable.Debounce(key="shop-8", seconds=0.3, max_wait=5)
    for edit in ("title", "price", "stock"):
        run_id = await engine.start("reindex", {"reason": edit}, debounce=window)
    # One run, with the last input, due 0.3 s after the last start (5 s after the first
    # at the latest).
    # --8<-- [end:debounce]
    ids["debounced"] = run_id
    return ids


async def main() -> None:
    engine = durable.Engine(
        os.environ["DURABLE_DSN"], workflows=[sync, billing, reindex], limits=limits
    )
    async with engine:
        accounts = [await engine.start("sync_account", {"account": a}) for a in "aab"]
        ids = await flow_control_calls(engine)
        # --8<-- [start:pause]
        await engine.pause("billing")  # workers stop claiming its jobs; runs keep state
        await engine.resume("billing")
        # --8<-- [end:pause]
        async with engine.worker(concurrency=4, poll_interval=0.1):
            for run_id in accounts:
                await engine.wait(run_id, timeout=30)
            assert await engine.wait(ids["debounced"], timeout=30) == {"build": "stock"}
            assert await engine.wait(ids["urgent"], timeout=30) == {
                "charge": "charged 5",
                "receipt": "mailed a@x.org",
            }
            await engine.wait(ids["later"], timeout=30)
            await engine.wait(ids["singleton"], timeout=30)
        assert await engine.paused() == []
    print("three account syncs, a billed order, a delayed, a singleton and a debounced reindex")


if __name__ == "__main__":
    asyncio.run(main())
