"""step: take a slot and a token of its named limit (or wait for them), run the handler;
complete, retry, or fail for good."""

from __future__ import annotations

import uuid

from durable.codec import returns
from durable.errors import DurableError, WorkerLost
from durable.flow import limit_key_text, wait_key
from durable.runtime.transition import (
    Complete,
    Err,
    Lease,
    Outcome,
    Transition,
    Visit,
    WaitLimit,
    after_failure,
    computed,
)
from durable.workflow import Step


async def visit(v: Visit, step: Step) -> Transition:
    """Run attempt `state.attempt` of `step` in the job's transaction (or lease it)."""
    s = v.state
    if s.lease_token is not None:
        # The job is still leased: its holder stopped heartbeating and the lease lapsed.
        lost = WorkerLost(
            f"the worker running attempt {s.attempt} of step {step.name!r} stopped "
            "heartbeating and its lease lapsed"
        )
        return after_failure(s, step.name, lost, step.max_attempts, step.backoff)
    token = None if step.transactional else uuid.uuid4()
    if step.limit is not None:
        waits = await _take_limit(v, step, step.limit, token)
        if waits is not None:
            return waits
    if token is not None:
        return Lease(token)
    ctx = v.context(step.name)
    what = f"step {step.name!r}"
    out = await v.call(
        what,
        ctx,
        lambda: v.invoke(step.fn, ctx),
        timeout=step.timeout,
        returns=returns(step.fn, what),
    )
    if isinstance(out, Err):
        return after_failure(s, step.name, out.error, step.max_attempts, step.backoff)
    return Complete(out.text)


async def _take_limit(
    v: Visit, step: Step, limit: str, token: uuid.UUID | None
) -> Transition | None:
    """None once the attempt holds a slot and a token of `limit`; else what the step does
    instead: wait for one (no attempt used), or fail this attempt (a `limit_key` that
    raised or gave no usable key)."""
    s = v.state
    key = ""
    if step.limit_key is not None:
        ctx = v.context(step.name)
        out = await computed(v, f"limit_key of step {step.name!r}", ctx, step.limit_key)
        if isinstance(out, Err):
            return after_failure(s, step.name, out.error, step.max_attempts, step.backoff)
        try:
            key = limit_key_text(out.value, f"limit_key of step {step.name!r}")
        except DurableError as exc:
            return after_failure(s, step.name, exc, step.max_attempts, step.backoff)
    wake_at = await v.acquire(limit, key, token)
    return None if wake_at is None else WaitLimit(wake_at, wait_key(limit, key))


def settle(v: Visit, step: Step, out: Outcome) -> Transition:
    """The transition of a leased attempt that finished outside any transaction."""
    if isinstance(out, Err):
        return after_failure(v.state, step.name, out.error, step.max_attempts, step.backoff)
    return Complete(out.text)
