"""child_workflow: start the child in the parent's transaction, park, and take its outcome
when its final transaction wakes the parent."""

from __future__ import annotations

import json

from durable.codec import input_text
from durable.errors import ChildFailed
from durable.flow import concurrency_key_of
from durable.runtime.transition import (
    Complete,
    Err,
    Noop,
    StartChild,
    Transition,
    Visit,
    after_failure,
)
from durable.workflow import ChildWorkflow


def _fail(v: Visit, node: ChildWorkflow, exc: BaseException) -> Transition:
    return after_failure(v.state, node.name, exc, 1, lambda _: 0.0)


async def visit(v: Visit, node: ChildWorkflow) -> Transition:
    """Start the child (once), or finish the node with the child's outcome."""
    s = v.state
    child_id = s.child_id
    if child_id is None:
        marker = await v.journal(f"{node.name}@child")
        if marker is not None:
            child_id = str(json.loads(marker)["run_id"])
    if child_id is None:
        ctx = v.context(node.name)
        out = await v.call(
            f"child_workflow {node.name!r}", ctx, lambda: v.invoke(node.start, ctx), store=False
        )
        if isinstance(out, Err):
            return _fail(v, node, out.error)
        spec = out.value
        if not (isinstance(spec, tuple | list) and len(spec) == 2):
            return _fail(
                v,
                node,
                TypeError(
                    f"child_workflow {node.name!r}: start must return (workflow_name, "
                    f"input), got {spec!r}"
                ),
            )
        name, child_input = spec
        wf = v.workflow(name) if isinstance(name, str) else None
        if wf is None:
            return _fail(
                v,
                node,
                LookupError(f"child_workflow {node.name!r}: workflow {name!r} is not registered"),
            )
        try:
            text = input_text(wf.input_codec, child_input, f"input of child workflow {name!r}")
            key = concurrency_key_of(wf.name, wf.concurrency, wf.concurrency_key, json.loads(text))
        except Exception as exc:
            return _fail(v, node, exc)
        return StartChild(wf, text, key)
    child = await v.child(child_id)
    if child is None:
        return _fail(v, node, ChildFailed(f"child run {child_id} was purged"))
    if child.status == "completed":
        return Complete(child.result or "null")
    if child.status in ("failed", "cancelled"):
        return _fail(
            v, node, ChildFailed(f"child run {child_id} ended {child.status}: {child.error}")
        )
    return Noop("the child has not finished")
