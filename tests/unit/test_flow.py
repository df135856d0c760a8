"""The flow-control declarations and the checks of their options (no database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

import durable
from durable.flow import check_start, concurrency_key_of, wait_key


async def noop(ctx: durable.Context) -> None:
    return None


def test_a_workflow_bound_needs_a_positive_integer_and_a_key_needs_a_bound() -> None:
    wf = durable.Workflow("w", concurrency=3, concurrency_key=lambda i: i["a"])
    assert wf.concurrency == 3
    assert durable.Workflow("plain").concurrency is None
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(durable.DefinitionError, match="concurrency"):
            durable.Workflow("w", concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(durable.DefinitionError, match="needs a concurrency bound"):
        durable.Workflow("w", concurrency_key=lambda i: "k")
    with pytest.raises(durable.DefinitionError, match="function of the input"):
        durable.Workflow("w", concurrency=1, concurrency_key="account")  # type: ignore[arg-type]


def test_the_concurrency_key_is_evaluated_on_the_input() -> None:
    assert concurrency_key_of("w", None, None, {}) is None
    assert concurrency_key_of("w", 2, None, {}) == ""
    assert concurrency_key_of("w", 2, lambda i: i["a"], {"a": "x"}) == "x"
    assert concurrency_key_of("w", 2, lambda i: i["n"], {"n": 7}) == "7"
    with pytest.raises(durable.ArgumentError, match="KeyError"):
        concurrency_key_of("w", 2, lambda i: i["a"], {})
    with pytest.raises(durable.ArgumentTypeError):
        concurrency_key_of("w", 2, lambda i: None, {})
    with pytest.raises(durable.ArgumentError):
        concurrency_key_of("w", 2, lambda i: "", {})


def test_a_step_limit_is_a_name_and_its_key_a_function() -> None:
    wf = durable.Workflow("w")
    wf.step("a", noop, limit="api", limit_key=lambda ctx: "k")
    step = wf.nodes[0]
    assert isinstance(step, durable.Step)
    assert step.limit == "api"
    assert step.limit_key is not None
    for bad in ("", "a\x1fb", 3):
        with pytest.raises(durable.DefinitionError, match="limit"):
            durable.Workflow("w").step("a", noop, limit=bad)  # type: ignore[arg-type]
    with pytest.raises(durable.DefinitionError, match="limit_key"):
        durable.Workflow("w").step("a", noop, limit="api", limit_key="k")  # type: ignore[arg-type]
    # A limit is not part of the shape a run is pinned to.
    plain = durable.Workflow("w").step("a", noop)
    assert plain.queue == durable.Workflow("w").step("a", noop, limit="api").queue


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, durable.ArgumentError),
        ({"rate": 0}, durable.ArgumentError),
        ({"rate": True}, durable.ArgumentTypeError),
        ({"concurrency": 2.0}, durable.ArgumentTypeError),
        ({"rate": 5, "per": 0}, durable.ArgumentError),
        ({"rate": 5, "per": float("inf")}, durable.ArgumentError),
    ],
)
def test_a_bad_limit_is_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        durable.Limit(**kwargs)


def test_limits_and_debounces_are_values() -> None:
    assert durable.Limit(rate=5, per=2) == durable.Limit(rate=5, per=2.0)
    assert durable.Limit(concurrency=1).per == 1.0
    assert durable.Debounce("k", 5, 60) == durable.Debounce(key="k", seconds=5.0, max_wait=60.0)
    assert durable.Debounce("k", 0).max_wait is None
    assert wait_key("stripe", "acct-1") == "stripe\x1facct-1"


def _start(**kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "priority": 0,
        "delay": None,
        "start_at": None,
        "singleton_key": None,
        "debounce": None,
        "idempotency_key": None,
    }
    return check_start(**{**options, **kwargs})


def test_start_options_are_checked_before_anything_is_written() -> None:
    assert _start(priority=-100).priority == -100
    assert _start(delay=3).delay == 3.0
    soon = datetime(2030, 1, 1, tzinfo=UTC)
    assert _start(start_at=soon).start_at == soon
    for kwargs in (
        {"priority": 101},
        {"priority": 1.0},
        {"delay": -1},
        {"delay": 1, "start_at": soon},
        {"start_at": datetime(2030, 1, 1)},
        {"singleton_key": ""},
        {"debounce": "k"},
        {"debounce": durable.Debounce("k", 1), "delay": 1},
        {"debounce": durable.Debounce("k", 1), "singleton_key": "s"},
        {"debounce": durable.Debounce("k", 1), "idempotency_key": "i"},
    ):
        with pytest.raises((durable.ArgumentError, durable.ArgumentTypeError)):
            _start(**kwargs)
    # Argument errors are also the built-in kinds, for callers that catch those.
    with pytest.raises(ValueError, match="priority"):
        _start(priority=500)
    with pytest.raises(TypeError, match="aware"):
        _start(start_at="tomorrow")
