"""step: run the handler; complete, retry, or fail for good."""

from __future__ import annotations

from durable.codec import returns
from durable.errors import WorkerLost
from durable.runtime.transition import (
    Complete,
    Err,
    Lease,
    Outcome,
    Transition,
    Visit,
    after_failure,
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
    if not step.transactional:
        return Lease()
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


def settle(v: Visit, step: Step, out: Outcome) -> Transition:
    """The transition of a leased attempt that finished outside any transaction."""
    if isinstance(out, Err):
        return after_failure(v.state, step.name, out.error, step.max_attempts, step.backoff)
    return Complete(out.text)
