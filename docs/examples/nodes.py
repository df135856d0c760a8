"""Every node kind, one small workflow each; docs/guides/workflows.md shows these parts.

`main()` registers them all with one engine, runs each against the PostgreSQL in
`DURABLE_DSN` with a background worker, and checks every result.
"""

from __future__ import annotations

# --8<-- [start:imports]
import asyncio
import os
from datetime import datetime, timedelta
from typing import Any

import durable
from durable.context import LoopContext

# --8<-- [end:imports]

TABLES = """
CREATE TABLE IF NOT EXISTS reservations (run_id text PRIMARY KEY, sku text NOT NULL);
"""

# --8<-- [start:step]
orders = durable.Workflow("order")


async def release(ctx: durable.Context) -> None:
    """Compensation of `reserve`: runs if a later node fails for good."""
    await ctx.conn.execute("DELETE FROM reservations WHERE run_id = $1", ctx.run_id)


@orders.step(compensate=release)
async def reserve(ctx: durable.Context) -> dict[str, Any]:
    await ctx.conn.execute(
        "INSERT INTO reservations (run_id, sku) VALUES ($1, $2)", ctx.run_id, ctx.input["sku"]
    )
    return {"sku": ctx.input["sku"]}


@orders.step(max_attempts=5, backoff=durable.exponential(base=0.05, cap=2.0), timeout=10)
async def charge(ctx: durable.Context) -> dict[str, Any]:
    if ctx.input["amount"] <= 0:
        raise durable.NonRetryable("amount must be positive")  # no retry: compensate now
    if ctx.attempt == 1:
        raise ConnectionError("payment gateway timed out")  # retried after the backoff
    return {"charged": ctx.input["amount"], "attempt": ctx.attempt}


@orders.step(transactional=False, timeout=30)
async def send_receipt(ctx: durable.Context) -> str:
    # Outside any transaction (ctx.conn is None), under a lease: at-least-once.
    await asyncio.sleep(0.01)  # stands in for a call to a mail API
    return f"receipt sent for run {ctx.run_id}"


# --8<-- [end:step]

# --8<-- [start:builder]
audit = durable.Workflow("audit")


async def load(ctx: durable.Context) -> int:
    return len(ctx.input["rows"])


async def report(ctx: durable.Context) -> str:
    return f"{ctx.results['load']} rows checked"


audit.step("load", load).step("report", report, max_attempts=1)
# --8<-- [end:builder]

# --8<-- [start:sleep]
reminder = durable.Workflow("reminder")
reminder.sleep("cool_off", 0.5)  # seconds
reminder.sleep("grace", lambda ctx: ctx.input["grace_seconds"])  # computed from the run


async def remind_at(ctx: durable.Context) -> datetime:
    return datetime.fromisoformat(ctx.input["remind_at"])  # an aware datetime


reminder.sleep_until("until_due", remind_at)


@reminder.step
async def remind(ctx: durable.Context) -> str:
    return f"reminded {ctx.input['user']}"


# --8<-- [end:sleep]

# --8<-- [start:signal]
expense = durable.Workflow("expense")
expense.wait_for_signal("approval", "approved", timeout=3600, default={"by": "nobody"})


@expense.step
async def pay(ctx: durable.Context) -> str:
    return f"paid {ctx.input['amount']}, approved by {ctx.results['approval']['by']}"


# --8<-- [end:signal]

# --8<-- [start:parallel]
notify = durable.Workflow("notify")


async def email(ctx: durable.Context) -> str:
    return f"mailed {ctx.input['user']}"


async def sms(ctx: durable.Context) -> str:
    return f"texted {ctx.input['user']}"


notify.parallel("channels", {"email": email, "sms": sms}, max_attempts=3)
# --8<-- [end:parallel]

# --8<-- [start:route]
shipping = durable.Workflow("shipping")


def choose(ctx: durable.SyncContext) -> str:  # a plain def: run on the engine's threads
    return "air" if ctx.input["express"] else "ground"


async def ground(ctx: durable.Context) -> str:
    return "arrives in 5 days"


async def air(ctx: durable.Context) -> str:
    return "arrives tomorrow"


shipping.route("ship", choose, {"ground": ground, "air": air})
# --8<-- [end:route]

# --8<-- [start:loop]
polling = durable.Workflow("poll")


def not_ready(ctx: durable.SyncContext, i: int) -> bool:
    checks = ctx.results["check"]  # the iteration results so far
    return not checks or checks[-1] != "ready"


async def check(ctx: LoopContext) -> str:
    return "ready" if ctx.iteration >= 2 else "pending"


polling.loop("check", not_ready, check, max_iterations=10)
# --8<-- [end:loop]

# --8<-- [start:child]
kyc = durable.Workflow("kyc")


@kyc.step
async def verify(ctx: durable.Context) -> dict[str, Any]:
    return {"verified": ctx.input["user"]}


onboarding = durable.Workflow("onboarding")
onboarding.child_workflow("identity", lambda ctx: ("kyc", {"user": ctx.input["user"]}))


@onboarding.step
async def activate(ctx: durable.Context) -> str:
    # The node's result is the child run's result: the mapping of the child's node results.
    # So the child step's own result is one level down, under the child's node name:
    # ctx.results["identity"] == {"verify": {"verified": "ann"}}
    verified = ctx.results["identity"]["verify"]["verified"]
    return f"activated {verified}"


# --8<-- [end:child]

WORKFLOWS = [orders, audit, reminder, expense, notify, shipping, polling, kyc, onboarding]


async def main() -> None:
    engine = durable.Engine(os.environ["DURABLE_DSN"], workflows=WORKFLOWS)
    async with engine, engine.worker(concurrency=8, poll_interval=0.1):
        async with engine.pool.acquire() as conn:
            await conn.execute(TABLES)

        # --8<-- [start:saga]
        ok = await engine.start("order", {"sku": "A1", "amount": 10})
        bad = await engine.start("order", {"sku": "B2", "amount": 0})
        result = await engine.wait(ok, timeout=30)
        assert result["charge"] == {"charged": 10, "attempt": 2}
        try:
            await engine.wait(bad, timeout=30)
        except durable.RunFailed as exc:
            print(exc.run.status, exc.run.error)  # failed NonRetryable: amount must be positive
        # --8<-- [end:saga]
        async with engine.pool.acquire() as conn:
            reserved = await conn.fetch("SELECT run_id FROM reservations")
        assert [r["run_id"] for r in reserved] == [ok], "B2's reservation was released"

        assert await engine.wait(await engine.start("audit", {"rows": [1, 2]}), timeout=10) == {
            "load": 2,
            "report": "2 rows checked",
        }

        due = datetime.now().astimezone() + timedelta(seconds=1.5)
        reminded = await engine.start(
            "reminder", {"user": "ann", "grace_seconds": 0.5, "remind_at": due.isoformat()}
        )

        # --8<-- [start:send-signal]
        run_id = await engine.start("expense", {"amount": 120})
        accepted = await engine.signal(run_id, "approved", {"by": "ann"})  # True: recorded
        # A webhook delivered twice: with a dedupe key, the run records the signal once.
        await engine.signal(run_id, "approved", {"by": "ann"}, dedupe_key="evt_81")
        await engine.signal(run_id, "approved", {"by": "ann"}, dedupe_key="evt_81")
        result = await engine.wait(run_id, timeout=30)
        # result["approval"] == {"by": "ann"}; result["pay"] == "paid 120, approved by ann"
        # --8<-- [end:send-signal]
        assert accepted
        assert result["pay"] == "paid 120, approved by ann"
        assert await engine.signal(run_id, "approved", {"by": "bob"}) is False  # finished

        notified = await engine.wait(await engine.start("notify", {"user": "ann"}), timeout=10)
        assert notified["channels"] == {"email": "mailed ann", "sms": "texted ann"}

        shipped = await engine.wait(await engine.start("shipping", {"express": True}), timeout=10)
        assert shipped["ship"] == {"branch": "air", "result": "arrives tomorrow"}

        polled = await engine.wait(await engine.start("poll", {}), timeout=10)
        assert polled["check"] == ["pending", "pending", "ready"]

        onboarding_id = await engine.start("onboarding", {"user": "ann"})
        onboarded = await engine.wait(onboarding_id, timeout=10)
        assert onboarded["activate"] == "activated ann"
        assert onboarded["identity"] == {"verify": {"verified": "ann"}}  # nested one level
        (child_id,) = (await engine.get_run(onboarding_id)).children
        child = await engine.get_run(child_id)
        assert child.workflow == "kyc"
        assert child.parent_id == onboarding_id

        slept = await engine.wait(reminded, timeout=10)
        assert slept == {
            "cool_off": None,
            "grace": None,
            "until_due": None,
            "remind": "reminded ann",
        }
    print("every node kind ran")


if __name__ == "__main__":
    asyncio.run(main())
