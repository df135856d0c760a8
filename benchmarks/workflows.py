"""The workflows the benchmarks run: no-op steps, so what is measured is durable's own cost
(journal, cursor, dispatch, commit), and a run that parks on a signal."""

from __future__ import annotations

import time
from typing import Any

import durable

CHAIN = "bench_chain"
FANOUT = "bench_fanout"
ONE_STEP = "bench_one"
PARKED = "bench_parked"
LOOP = "bench_loop"


async def noop(ctx: durable.Context) -> Any:
    return None


def chain(steps: int) -> durable.Workflow:
    """One run of `steps` no-op steps."""
    wf = durable.Workflow(CHAIN)
    for i in range(steps):
        wf.step(f"s{i}", noop)
    return wf


def fanout(steps: int) -> durable.Workflow:
    """Many runs of a few no-op steps each."""
    wf = durable.Workflow(FANOUT)
    for i in range(steps):
        wf.step(f"s{i}", noop)
    return wf


#: Keys of the fan-out with a per-key bound: each run counts under `i % KEYS`.
KEYS = 1000
#: The limit of the limited fan-out: far above what one worker achieves.
BENCH_LIMIT = "bench_rate"


def fanout_keyed(steps: int) -> durable.Workflow:
    """The fan-out's runs under a bound of one active run per key, over `KEYS` keys."""
    wf = durable.Workflow(FANOUT, concurrency=1, concurrency_key=lambda i: i["i"] % KEYS)
    for i in range(steps):
        wf.step(f"s{i}", noop)
    return wf


def fanout_limited(steps: int, limited: int) -> durable.Workflow:
    """The fan-out's runs with their first `limited` steps taking a token of `BENCH_LIMIT`."""
    wf = durable.Workflow(FANOUT)
    for i in range(steps):
        wf.step(f"s{i}", noop, limit=BENCH_LIMIT if i < limited else None)
    return wf


def bench_limits() -> dict[str, durable.Limit]:
    """A rate limit set above the achievable rate (a million starts a second)."""
    return {BENCH_LIMIT: durable.Limit(rate=1_000_000, per=1.0)}


def one_step() -> durable.Workflow:
    """A run of a single no-op step (drain, start, latency)."""
    return durable.Workflow(ONE_STEP).step("only", noop)


def parked() -> durable.Workflow:
    """A run that waits for a signal that never comes (memory)."""
    return durable.Workflow(PARKED).wait_for_signal("wait", "go")


def loop(iterations: int, marks: list[float]) -> durable.Workflow:
    """One run of a loop of `iterations` no-op iterations; `marks` gets the clock at the
    start of each iteration (the condition runs first)."""

    def more(ctx: durable.Context, i: int) -> bool:
        marks.append(time.perf_counter())
        return i < iterations

    return durable.Workflow(LOOP).loop("spin", more, noop, max_iterations=iterations + 1)
