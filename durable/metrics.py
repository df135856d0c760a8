"""Prometheus metrics of this process, when `prometheus-client` is installed (the `web`
extra): runs started and finished, node attempts and failures, node durations. Counted
where they happen (starts in the client, transitions where the runtime applies them), so
each process exports its own and Prometheus sums them; the admin app's `/metrics` adds the
database's view (runs by status, queue depth, oldest due job, workers alive). Without
`prometheus-client` every call here does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_metrics: dict[str, Any] = {}
#: The labelled series already made, by (metric, *label values): prometheus-client's
#: `labels()` checks its arguments and takes a lock on every call, which was about a tenth
#: of a no-op step's Python time (docs/performance.md). As bounded as the label values
#: (workflows, nodes, statuses).
_series: dict[tuple[str, ...], Any] = {}


def _of(metric: str, *labels: str) -> Any:
    key = (metric, *labels)
    series = _series.get(key)
    if series is None:
        series = _series[key] = _metrics[metric].labels(*labels)
    return series


def _setup(registry: Any) -> None:
    _metrics["started"] = Counter(
        "durable_runs_started",
        "Runs started by this process",
        ["workflow"],
        registry=registry,
    )
    _metrics["finished"] = Counter(
        "durable_runs_finished",
        "Runs that reached a final status in this process",
        ["workflow", "status"],
        registry=registry,
    )
    _metrics["attempts"] = Counter(
        "durable_node_attempts",
        "Node attempts (steps, branches, iterations, compensations) that ended",
        ["workflow", "node"],
        registry=registry,
    )
    _metrics["failures"] = Counter(
        "durable_node_failures",
        "Node attempts that failed (retried or final)",
        ["workflow", "node", "final"],
        registry=registry,
    )
    _metrics["duration"] = Histogram(
        "durable_node_duration_seconds",
        "Time a worker spent on one job of a node, claim to commit",
        ["workflow", "node"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        registry=registry,
    )


try:
    from prometheus_client import REGISTRY, Counter, Histogram
except ImportError:  # pragma: no cover - the web extra is not installed
    pass
else:
    _setup(REGISTRY)


def enabled() -> bool:
    """True when prometheus-client is installed."""
    return bool(_metrics)


def declare(workflow: str, nodes: Iterable[str]) -> None:
    """Create a workflow's per-node series before its first job: Prometheus sees them from
    zero, and no job pays for making them (a histogram's series costs tens of
    microseconds, which a workflow of a thousand distinct steps paid on every step)."""
    if _metrics:
        for node in nodes:
            _of("attempts", workflow, node)
            _of("duration", workflow, node)


def run_started(workflow: str) -> None:
    if _metrics:
        _of("started", workflow).inc()


def run_finished(workflow: str, status: str) -> None:
    if _metrics:
        _of("finished", workflow, status).inc()


def attempt(workflow: str, node: str, *, failed: bool = False, final: bool = False) -> None:
    if _metrics:
        _of("attempts", workflow, node).inc()
        if failed:
            _of("failures", workflow, node, "true" if final else "false").inc()


def duration(workflow: str, node: str, seconds: float) -> None:
    if _metrics:
        _of("duration", workflow, node).observe(seconds)


def timed(handle: Callable[[Any, Any], Awaitable[T]]) -> Callable[[Any, Any], Awaitable[T]]:
    """Wrap a job handler to observe how long each job of a node takes."""
    if not _metrics:
        return handle

    async def observed(conn: Any, job: Any) -> T:
        started = time.monotonic()
        try:
            return await handle(conn, job)
        finally:
            s = job.prefetched
            node = s.current_node or s.task
            if s.task == "branch" and s.branch is not None:
                node = f"{node}#{s.branch}"
            duration(s.workflow, node, time.monotonic() - started)

    return observed
