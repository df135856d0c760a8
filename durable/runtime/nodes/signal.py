"""wait_for_signal: take the oldest matching signal from the mailbox, or park until one
arrives or the timeout passes."""

from __future__ import annotations

from datetime import timedelta

from durable.errors import SignalTimeout
from durable.runtime.transition import (
    Complete,
    Err,
    Park,
    Transition,
    Visit,
    after_failure,
    computed,
    to_json,
)
from durable.workflow import WaitForSignal


async def visit(v: Visit, node: WaitForSignal) -> Transition:
    """Consume a buffered signal, park for one, or time out."""
    s = v.state
    name = s.waiting_for
    first = name is None
    if name is None:
        ctx = v.context(node.name)
        out = await computed(v, f"wait_for_signal {node.name!r}", ctx, node.signal)
        if isinstance(out, Err):
            return after_failure(s, node.name, out.error, 1, lambda _: 0.0)
        if not isinstance(out.value, str) or not out.value or "\x00" in out.value:
            bad = TypeError(
                f"wait_for_signal {node.name!r}: the signal name must be a non-empty string "
                f"without NUL, got {out.value!r}"
            )
            return after_failure(s, node.name, bad, 1, lambda _: 0.0)
        name = out.value
    got = await v.oldest_signal(name)
    if got is not None:
        return Complete(got.payload, consume=got.id)
    if first:
        wake_at = None if node.timeout is None else s.now + timedelta(seconds=node.timeout)
        return Park(wake_at, name)
    if s.wake_at is not None and s.wake_at <= s.now:
        if node.has_default:
            return Complete(
                to_json(node.default, f"default of {node.name!r}"),
                note="timed out (default used)",
            )
        timeout = node.timeout or 0.0
        return after_failure(
            s,
            node.name,
            SignalTimeout(f"no signal {name!r} arrived within {timeout:g} s"),
            1,
            lambda _: 0.0,
        )
    return Park(s.wake_at, name)
