"""route: `select` chooses a branch once (journaled in a transaction of its own), then the
branch runs; retries run the same branch."""

from __future__ import annotations

import json

from durable.codec import returns
from durable.errors import DefinitionChanged
from durable.runtime.transition import (
    Choose,
    Complete,
    Err,
    Transition,
    Visit,
    after_failure,
    to_json,
)
from durable.workflow import Route


async def visit(v: Visit, node: Route) -> Transition:
    """Choose the branch if not yet chosen, else run it."""
    s = v.state
    ctx = v.context(node.name)
    decided = await v.journal(f"{node.name}@route")
    if decided is None:
        out = await v.call(
            f"route {node.name!r} select", ctx, lambda: v.invoke(node.select, ctx), store=False
        )
        if isinstance(out, Err):
            return after_failure(s, node.name, out.error, node.max_attempts, node.backoff)
        if not isinstance(out.value, str) or out.value not in node.branches:
            known = ", ".join(repr(b) for b in node.branches)
            bad = ValueError(
                f"route {node.name!r} chose unknown branch {out.value!r}; known branches: {known}"
            )
            return after_failure(s, node.name, bad, 1, lambda _: 0.0)
        return Choose(out.value)
    branch = json.loads(decided)
    handler = node.branches.get(branch)
    if handler is None:
        changed = DefinitionChanged(
            f"route {node.name!r} journaled branch {branch!r}, which the workflow no longer "
            "declares"
        )
        return after_failure(s, node.name, changed, 1, lambda _: 0.0)
    what = f"route {node.name!r} branch {branch!r}"
    out = await v.call(what, ctx, lambda: v.invoke(handler, ctx), returns=returns(handler, what))
    if isinstance(out, Err):
        return after_failure(s, node.name, out.error, node.max_attempts, node.backoff)
    return Complete(
        to_json({"branch": branch, "result": json.loads(out.text)}, f"result of {node.name!r}")
    )
