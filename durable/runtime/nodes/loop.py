"""loop: before each iteration `condition(ctx, i)` decides; each iteration commits its own
journal row and has its own retry budget."""

from __future__ import annotations

from typing import Any

from durable.codec import encoded, returns
from durable.context import LoopContext
from durable.errors import NonRetryable
from durable.runtime.transition import (
    Complete,
    Err,
    Iterate,
    Transition,
    Visit,
    after_failure,
    to_json,
)
from durable.workflow import Loop


async def visit(v: Visit, node: Loop) -> Transition:
    """Run iteration `state.iteration` (or finish the loop when the condition says so)."""
    s = v.state
    i = s.iteration
    so_far = await v.iterations(node.name)
    ctx = v.context(node.name, results={**s.results, node.name: so_far})
    key = f"{node.name}#{i}"

    async def iteration() -> tuple[bool, Any]:
        if not await v.invoke(node.condition, ctx, i):
            return False, None
        if i >= node.max_iterations:
            raise NonRetryable(
                f"loop {node.name!r}: condition still holds after "
                f"max_iterations={node.max_iterations}"
            )
        body_ctx = LoopContext(
            input=ctx.input,
            results=ctx.results,
            run_id=ctx.run_id,
            workflow=ctx.workflow,
            node=key,
            attempt=ctx.attempt,
            conn=ctx.conn,
            iteration=i,
        )
        return True, await v.invoke(node.body, body_ctx)

    out = await v.call(f"loop {node.name!r}", ctx, iteration, store=False)
    if isinstance(out, Err):
        return after_failure(s, key, out.error, node.max_attempts, node.backoff)
    more, value = out.value
    if not more:
        return Complete(to_json(so_far, f"result of loop {node.name!r}"))
    try:
        what = f"result of {key!r}"
        text = to_json(encoded(returns(node.body, what), value, what), what)
    except Exception as exc:
        return after_failure(s, key, exc, node.max_attempts, node.backoff)
    return Iterate(i, text)
