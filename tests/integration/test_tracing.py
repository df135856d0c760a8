"""OpenTelemetry spans per node, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import durable
from tests.integration.helpers import running_engine


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process: share it across this module.
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    yield memory
    memory.clear()


async def test_each_node_execution_is_a_span_with_run_fields(
    db: Any, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    wf = durable.Workflow("traced")

    @wf.step(max_attempts=2, backoff=0)
    async def flaky(ctx: durable.Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return ctx.attempt

    wf.parallel("fan", {"a": _branch, "b": _branch})

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"flaky": 2, "fan": {"a": 1, "b": 1}}

    spans = [
        s for s in exporter.get_finished_spans() if s.attributes.get("durable.run_id") == run_id
    ]
    names = [s.name for s in spans]
    assert names.count("durable.step flaky") == 2
    assert "durable.parallel fan" in names
    assert sorted(n for n in names if n.startswith("durable.branch")) == [
        "durable.branch a",
        "durable.branch b",
    ]
    first, second = [s for s in spans if s.name == "durable.step flaky"]
    assert first.attributes["durable.workflow"] == "traced"
    assert first.attributes["durable.attempt"] == 1
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["durable.final_failure"] is False
    assert any(e.name == "exception" for e in first.events)
    assert second.attributes["durable.attempt"] == 2
    assert second.status.status_code is not StatusCode.ERROR


async def test_a_final_failure_is_marked_and_compensation_is_traced(
    db: Any, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    wf = durable.Workflow("traced_fail")

    async def undo(ctx: durable.Context) -> None:
        return None

    @wf.step(compensate=undo)
    async def first(ctx: durable.Context) -> int:
        return 1

    @wf.step
    async def boom(ctx: durable.Context) -> None:
        raise durable.NonRetryable("no")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)

    spans = [
        s for s in exporter.get_finished_spans() if s.attributes.get("durable.run_id") == run_id
    ]
    (failed,) = [s for s in spans if s.name == "durable.step boom"]
    assert failed.attributes["durable.final_failure"] is True
    assert failed.status.status_code is StatusCode.ERROR
    assert any(s.name == "durable.compensate compensation" for s in spans)


async def _branch(ctx: durable.Context) -> int:
    return 1
