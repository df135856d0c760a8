"""Saga compensation: the compensators of completed steps (and parallel branches) run in
reverse order of completion, each in its own transaction with its own journal row and
retry budget; a compensator that still fails is recorded and the walk goes on."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from durable.codec import returns
from durable.runtime.transition import (
    Compensated,
    Err,
    Finish,
    Retry,
    Transition,
    Visit,
    after_failure,
)
from durable.workflow import Handler, Parallel, Step, Workflow

log = logging.getLogger("durable.runtime")


def compensator(
    wf: Workflow, node_name: str, key: str
) -> tuple[Handler, int, Callable[[int], float]] | None:
    """The compensator of journal row `key` (of node `node_name`), with its budget."""
    node = wf.node(node_name)
    if isinstance(node, Step) and "#" not in key and node.compensate is not None:
        return node.compensate, node.max_attempts, node.backoff
    if isinstance(node, Parallel) and "#" in key:
        fn = node.compensate.get(key.split("#", 1)[1])
        if fn is not None:
            return fn, node.max_attempts, node.backoff
    return None


async def visit(v: Visit, wf: Workflow, rows: list[Any]) -> Transition:
    """Run the next compensator (journal `rows` newest first), or finish the run."""
    s = v.state
    undone = {r["key"].rsplit("@", 1)[0] for r in rows if r["key"].endswith("@compensate")}
    for row in rows:
        key, node_name = row["key"], row["node"]
        if row["status"] != "completed" or "@" in key or key in undone:
            continue
        if wf.position(node_name) is None:
            log.warning(
                "run %s: node %r is no longer declared by workflow %r; it cannot be compensated",
                s.run_id,
                node_name,
                wf.name,
                extra={"run_id": s.run_id, "workflow": wf.name, "node": node_name},
            )
            continue
        found = compensator(wf, node_name, key)
        if found is None:
            continue
        fn, max_attempts, backoff = found
        target = f"{key}@compensate"
        ctx = v.context(target)
        what = f"compensator {target!r}"
        out = await v.call(
            what, ctx, functools.partial(v.invoke, fn, ctx), returns=returns(fn, what)
        )
        if not isinstance(out, Err):
            return Compensated(target, node_name, "completed", text=out.text)
        verdict = after_failure(s, target, out.error, max_attempts, backoff)
        if isinstance(verdict, Retry):
            return verdict
        log.error(
            "run %s: compensator %s failed for good: %s",
            s.run_id,
            target,
            verdict.error,
            extra={"run_id": s.run_id, "node": target, "error": verdict.error},
        )
        return Compensated(target, node_name, "failed", error=verdict.error)
    return Finish(s.ending or "failed")
