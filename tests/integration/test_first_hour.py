"""What a new user trips over in the library (issue 12): exceptions out of
`engine.worker()`, reusing an idempotency key with another input, signals no wait can
consume, argument errors that are both `DurableError` and `TypeError`/`ValueError`."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import fetchval, open_engine, running_engine

import durable


def order() -> durable.Workflow:
    wf = durable.Workflow("order")

    @wf.step(max_attempts=1)
    async def charge(ctx: durable.Context) -> str:
        if ctx.input.get("fail"):
            raise durable.NonRetryable("declined")
        return "charged"

    wf.wait_for_signal("approval", "approved")
    return wf


async def test_exceptions_raised_in_the_worker_block_come_out_as_themselves(db: Any) -> None:
    """`except durable.RunFailed:` around `async with engine.worker():` matches, and so does
    the user's own `KeyError`: neither comes out wrapped in an ExceptionGroup."""
    wf = order()
    async with open_engine(db, wf) as engine:
        with pytest.raises(durable.RunFailed):
            async with engine.worker(concurrency=2, poll_interval=0.05):
                await engine.wait(await engine.start(wf, {"fail": True}), timeout=10)
        with pytest.raises(KeyError, match="mine"):
            async with engine.worker(concurrency=2, poll_interval=0.05):
                raise KeyError("mine")


async def test_an_idempotency_key_reused_with_another_input_is_refused(db: Any) -> None:
    """Stripe-style: the same key with the same input returns the first run; with another
    input it raises `IdempotencyConflict` naming the key, and writes nothing."""
    wf = order()
    async with open_engine(db, wf) as engine:
        first = await engine.start(wf, {"sku": "A1"}, idempotency_key="req-42")
        assert await engine.start(wf, {"sku": "A1"}, idempotency_key="req-42") == first
        with pytest.raises(durable.IdempotencyConflict, match="'req-42'") as info:
            await engine.start(wf, {"sku": "B2"}, idempotency_key="req-42")
        assert first in str(info.value)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 1


async def test_a_signal_no_wait_can_consume_is_refused(db: Any) -> None:
    """Every wait of `order` has a fixed name: a signal of another name raises an
    `ArgumentError` (also a ValueError) listing the names it waits for; the right one is
    recorded. A workflow with a computed wait name accepts any name."""
    wf = order()
    computed = durable.Workflow("computed")
    computed.wait_for_signal("wait", lambda ctx: ctx.input["name"])
    async with running_engine(db, wf, computed) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.ArgumentError, match=r"'aproved'.*'approved'"):
            await engine.signal(run_id, "aproved")
        with pytest.raises(ValueError, match="no wait"):
            await engine.signal(run_id, "other")
        assert await engine.signal(run_id, "approved", {"by": "ann"}) is True
        assert await engine.wait(run_id, timeout=10) == {
            "charge": "charged",
            "approval": {"by": "ann"},
        }
        other = await engine.start(computed, {"name": "go"})
        assert await engine.signal(other, "anything") is True
        assert await engine.signal(other, "go") is True
        await engine.wait(other, timeout=10)


async def test_argument_errors_are_durable_errors_and_type_or_value_errors(db: Any) -> None:
    wf = order()
    async with open_engine(db, wf) as engine:
        with pytest.raises(durable.ArgumentTypeError) as bad_type:
            await engine.start(wf, ["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(durable.ArgumentError) as bad_key:
            await engine.start(wf, {}, idempotency_key="")
        with pytest.raises(durable.ArgumentError):
            await engine.list_runs(limit=0)
    assert isinstance(bad_type.value, durable.DurableError)
    assert isinstance(bad_type.value, TypeError)
    assert isinstance(bad_key.value, durable.DurableError)
    assert isinstance(bad_key.value, ValueError)
