"""Optional OpenTelemetry spans, one per node execution, when `opentelemetry-api` is installed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
except ImportError:  # the `otel` extra is optional
    trace = None  # type: ignore[assignment]


@contextlib.contextmanager
def node_span(kind: str, node: str, **attributes: Any) -> Iterator[None]:
    """A span `durable.<kind> <node>` around one node execution (no-op without OTel)."""
    # Without a configured tracer provider every span is a no-op: skip the work.
    if trace is None or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield
        return
    tracer = trace.get_tracer("durable")
    attrs = {f"durable.{k}": v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(f"durable.{kind} {node}", attributes=attrs):
        yield


def record_failure(exc: BaseException, *, final: bool) -> None:
    """Mark the current node span as failed (an attempt, or the node for good)."""
    if trace is None:
        return
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_attribute("durable.final_failure", final)
    span.set_status(Status(StatusCode.ERROR, str(exc)))
