"""sleep / sleep_until: compute the wake time once, from the database clock; park; wake."""

from __future__ import annotations

from datetime import datetime, timedelta

from durable.runtime.transition import (
    Complete,
    Err,
    Park,
    Transition,
    Visit,
    after_failure,
    computed,
)
from durable.workflow import MAX_WAIT, Sleep, SleepUntil, is_seconds


async def visit(v: Visit, node: Sleep | SleepUntil) -> Transition:
    """Park until the stored wake time; a job delivered early parks again."""
    s = v.state
    if s.wake_at is not None:
        return Park(s.wake_at) if s.wake_at > s.now else Complete("null")
    ctx = v.context(node.name)
    if isinstance(node, Sleep):
        out = await computed(v, f"sleep {node.name!r}", ctx, node.seconds)
        if isinstance(out, Err):
            return after_failure(s, node.name, out.error, 1, lambda _: 0.0)
        if not is_seconds(out.value):
            bad = TypeError(
                f"sleep {node.name!r}: expected seconds >= 0 and <= {MAX_WAIT:.0f}, "
                f"got {out.value!r}"
            )
            return after_failure(s, node.name, bad, 1, lambda _: 0.0)
        wake_at = s.now + timedelta(seconds=float(out.value))
    else:
        out = await computed(v, f"sleep_until {node.name!r}", ctx, node.when)
        if isinstance(out, Err):
            return after_failure(s, node.name, out.error, 1, lambda _: 0.0)
        when = out.value
        if not isinstance(when, datetime) or when.tzinfo is None:
            bad = TypeError(f"sleep_until {node.name!r}: expected an aware datetime, got {when!r}")
            return after_failure(s, node.name, bad, 1, lambda _: 0.0)
        wake_at = when
    return Complete("null") if wake_at <= s.now else Park(wake_at)
