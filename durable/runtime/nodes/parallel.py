"""parallel: fan out one job per branch; each branch commits its own journal row; the node
completes when the last branch commits."""

from __future__ import annotations

from durable.codec import returns
from durable.runtime.transition import (
    BranchDone,
    Complete,
    Err,
    FanOut,
    Noop,
    Transition,
    Visit,
    after_failure,
    gathered,
)
from durable.workflow import Parallel


async def visit(v: Visit, node: Parallel) -> Transition:
    """The advance job at a parallel node: start the branches that have not committed."""
    done = await v.sub_results(node.name)
    order = tuple(node.branches)
    if all(b in done for b in order):
        return Complete(gathered(done, order, f"result of parallel {node.name!r}"))
    return FanOut(order)


async def branch(v: Visit, node: Parallel, key: str) -> Transition:
    """A branch job: run the branch's handler as attempt `state.attempt` of `node#key`."""
    s = v.state
    if s.replay is not None:
        return Noop("the branch committed already")
    handler = node.branches.get(key)
    if handler is None or s.branches is None or key not in s.branches:
        return Noop("the run is not fanning out this branch")
    journal_key = f"{node.name}#{key}"
    ctx = v.context(journal_key)
    what = f"branch {journal_key!r}"
    out = await v.call(what, ctx, lambda: v.invoke(handler, ctx), returns=returns(handler, what))
    if isinstance(out, Err):
        return after_failure(s, journal_key, out.error, node.max_attempts, node.backoff)
    return BranchDone(key, out.text)


async def complete(v: Visit, node: Parallel) -> Transition:
    """After the last branch committed: the node's result, `{branch: result}`."""
    done = await v.sub_results(node.name)
    order = tuple(node.branches)
    return Complete(gathered(done, order, f"result of parallel {node.name!r}"))
