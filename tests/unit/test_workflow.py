"""Workflow definitions, backoffs, Engine construction and the public names (no database)."""

from __future__ import annotations

import math
import pickle
import types

import pytest

import durable
import durable.errors
from durable.nodes import MAX_NAME, Step


async def handler(ctx: durable.Context) -> int:
    return 1


async def undo(ctx: durable.Context) -> None:
    return None


def sync_handler(ctx: durable.SyncContext) -> int:
    return 1


class AsyncCallable:
    async def __call__(self, ctx: durable.Context) -> str:
        return "called"


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "   ", 123, None, b"bytes", "x" * (MAX_NAME + 1), "a#b", "a@b", "#", "@compensate"],
)
def test_workflow_name_is_validated(name: object) -> None:
    with pytest.raises(durable.DefinitionError):
        durable.Workflow(name)  # type: ignore[arg-type]


def test_workflow_name_at_the_length_limit_is_fine() -> None:
    assert durable.Workflow("w" * MAX_NAME).name == "w" * MAX_NAME


@pytest.mark.parametrize(
    "name", ["", "  ", 42, None, "x" * (MAX_NAME + 1), "a#1", "a@compensate", "@", "#"]
)
def test_node_name_is_validated(name: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError):
        wf.step(name, handler)  # type: ignore[call-overload]
    assert wf.nodes == ()


def test_duplicate_node_names_are_refused() -> None:
    wf = durable.Workflow("w").step("a", handler)
    with pytest.raises(durable.DefinitionError, match="already has a node named 'a'"):
        wf.step("a", handler)
    with pytest.raises(durable.DefinitionError):

        @wf.step("a")
        async def other(ctx: durable.Context) -> None: ...

    assert [n.name for n in wf.nodes] == ["a"]


def test_duplicate_node_names_via_the_decorator_are_refused() -> None:
    wf = durable.Workflow("w")
    wf.step("handler", undo)
    with pytest.raises(durable.DefinitionError):
        wf.step(handler)  # named after the function: "handler" again


# -- handlers ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["handler", 42])
def test_handlers_must_be_functions(fn: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError):
        wf.step("a", fn)  # type: ignore[call-overload]
    assert wf.nodes == ()


@pytest.mark.parametrize("fn", ["undo", 42])
def test_compensators_must_be_functions(fn: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError):
        wf.step("a", handler, compensate=fn)  # type: ignore[arg-type]
    assert wf.nodes == ()


def test_plain_functions_are_handlers_too() -> None:
    # They run on the engine's threads (tests/integration/test_sync_handlers.py).
    wf = durable.Workflow("w")
    wf.step(sync_handler)
    wf.step("b", lambda ctx: 1, compensate=sync_handler)
    wf.loop("c", lambda ctx, i: i < 2, sync_handler)
    wf.parallel("d", {"x": sync_handler, "y": handler})
    assert [n.name for n in wf.nodes] == ["sync_handler", "b", "c", "d"]
    node = wf.nodes[0]
    assert isinstance(node, Step)
    assert node.fn is sync_handler


def test_async_callable_objects_are_handlers() -> None:
    wf = durable.Workflow("w").step("a", AsyncCallable(), compensate=AsyncCallable())
    assert [n.name for n in wf.nodes] == ["a"]


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [0, -1, 1.5, True, False, "3", None])
def test_bad_max_attempts(max_attempts: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError, match="max_attempts"):
        wf.step("a", handler, max_attempts=max_attempts)  # type: ignore[arg-type]
    assert wf.nodes == ()


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, "x", True])
def test_bad_timeout(timeout: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError, match="timeout"):
        wf.step("a", handler, timeout=timeout)  # type: ignore[arg-type]
    assert wf.nodes == ()


@pytest.mark.parametrize("backoff", [-1, -0.5, "x", math.nan, math.inf, True, [1]])
def test_bad_backoff(backoff: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError, match="backoff"):
        wf.step("a", handler, backoff=backoff)  # type: ignore[arg-type]
    assert wf.nodes == ()


@pytest.mark.parametrize("transactional", [1, 0, "yes", None])
def test_transactional_must_be_bool(transactional: object) -> None:
    wf = durable.Workflow("w")
    with pytest.raises(durable.DefinitionError, match="transactional"):
        wf.step("a", handler, transactional=transactional)  # type: ignore[arg-type]
    assert wf.nodes == ()


def test_good_options_are_kept() -> None:
    wf = durable.Workflow("w")
    wf.step(
        "a",
        handler,
        max_attempts=7,
        backoff=0.25,
        compensate=undo,
        timeout=2,
        transactional=False,
    )
    (step,) = wf.nodes
    assert isinstance(step, Step)
    assert step.max_attempts == 7
    assert step.backoff(1) == 0.25
    assert step.backoff(5) == 0.25
    assert step.compensate is undo
    assert step.timeout == 2.0
    assert step.transactional is False
    assert step.fn is handler


def test_defaults() -> None:
    (step,) = durable.Workflow("w").step("a", handler).nodes
    assert isinstance(step, Step)
    assert step.max_attempts == 3
    assert step.backoff is durable.default_backoff
    assert step.compensate is None
    assert step.timeout is None
    assert step.transactional is True


def test_backoff_zero_and_callable() -> None:
    wf = durable.Workflow("w")
    wf.step("zero", handler, backoff=0)
    wf.step("fn", handler, backoff=lambda n: n * 10.0)
    zero, fn = wf.nodes
    assert isinstance(zero, Step)
    assert isinstance(fn, Step)
    assert zero.backoff(3) == 0.0
    assert fn.backoff(3) == 30.0


# -- forms ---------------------------------------------------------------------------------


def test_builder_form_is_chainable() -> None:
    wf = durable.Workflow("order")
    returned = wf.step("a", handler)
    assert returned is wf
    assert wf.step("b", handler).step("c", handler, compensate=undo) is wf
    assert [n.name for n in wf.nodes] == ["a", "b", "c"]


def test_decorator_names_the_node_after_the_function() -> None:
    wf = durable.Workflow("order")

    @wf.step
    async def charge(ctx: durable.Context) -> dict[str, int]:
        return {"ok": 1}

    assert isinstance(charge, types.FunctionType)
    assert charge.__name__ == "charge"
    (node,) = wf.nodes
    assert node.name == "charge"
    assert node.kind == "step"
    assert isinstance(node, Step)
    assert node.fn is charge


def test_decorator_with_options() -> None:
    wf = durable.Workflow("order")

    async def refund(ctx: durable.Context) -> None: ...

    @wf.step(max_attempts=5, compensate=refund)
    async def capture(ctx: durable.Context) -> int:
        return 2

    assert capture.__name__ == "capture"
    (node,) = wf.nodes
    assert isinstance(node, Step)
    assert node.name == "capture"
    assert node.max_attempts == 5
    assert node.compensate is refund
    assert node.fn is capture


def test_decorator_with_an_explicit_name() -> None:
    wf = durable.Workflow("order")

    @wf.step("custom", timeout=3)
    async def fn(ctx: durable.Context) -> int:
        return 2

    (node,) = wf.nodes
    assert isinstance(node, Step)
    assert node.name == "custom"
    assert node.timeout == 3.0
    assert node.fn is fn


def test_nodes_is_a_tuple_in_declaration_order() -> None:
    wf = durable.Workflow("order")
    wf.step("first", handler)

    @wf.step
    async def second(ctx: durable.Context) -> None: ...

    wf.step("third", handler, compensate=undo)
    nodes = wf.nodes
    assert isinstance(nodes, tuple)
    assert [n.name for n in nodes] == ["first", "second", "third"]
    assert [n.kind for n in nodes] == ["step", "step", "step"]
    assert all(isinstance(n, durable.Node) for n in nodes)
    # A snapshot: later declarations do not change a tuple already handed out.
    wf.step("fourth", handler)
    assert len(nodes) == 3
    assert len(wf.nodes) == 4
    assert wf.node("second") is wf.nodes[1]
    assert wf.node("missing") is None


# -- backoff helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 12))
def test_default_backoff(n: int) -> None:
    assert durable.default_backoff(n) == min(2**n, 60)


def test_default_backoff_values() -> None:
    assert [durable.default_backoff(n) for n in (1, 2, 3, 5, 6, 7, 100)] == [
        2,
        4,
        8,
        32,
        60,
        60,
        60,
    ]


def test_exponential_without_jitter() -> None:
    backoff = durable.exponential(base=0.5, factor=3, cap=10)
    assert backoff(1) == 1.5
    assert backoff(2) == 4.5
    assert backoff(3) == 10
    assert backoff(50) == 10


def test_exponential_with_jitter_stays_within_zero_and_the_cap() -> None:
    cap = 5.0
    backoff = durable.exponential(base=1, factor=2, cap=cap, jitter=True)
    values = [backoff(n) for n in range(1, 30) for _ in range(50)]
    assert all(0 <= v <= cap for v in values)
    # and within [0, the un-jittered delay]
    assert all(0 <= backoff(1) <= 2 for _ in range(200))
    assert len(set(values)) > 1  # it does jitter


def test_exponential_with_jitter_as_a_step_backoff() -> None:
    wf = durable.Workflow("w").step("a", handler, backoff=durable.exponential(cap=3, jitter=True))
    (step,) = wf.nodes
    assert isinstance(step, Step)
    assert all(0 <= step.backoff(n) <= 3 for n in range(1, 20))


# -- Engine construction (no connection is made) --------------------------------------------


def make_workflow(name: str = "w") -> durable.Workflow:
    return durable.Workflow(name).step("a", handler)


def test_engine_needs_a_dsn_or_a_pool() -> None:
    with pytest.raises(durable.ConfigurationError):
        durable.Engine(workflows=[make_workflow()])


def test_engine_refuses_both_a_dsn_and_a_pool() -> None:
    with pytest.raises(durable.ConfigurationError):
        durable.Engine("postgresql://localhost/x", pool=object())  # type: ignore[arg-type]


def test_engine_construction_does_not_connect() -> None:
    engine = durable.Engine("postgresql://nobody@127.0.0.1:1/none", workflows=[make_workflow()])
    assert set(engine.workflows) == {"w"}
    with pytest.raises(durable.ConfigurationError):
        _ = engine.pool


def test_engine_refuses_a_workflow_without_nodes() -> None:
    with pytest.raises(durable.DefinitionError, match="no nodes"):
        durable.Engine("postgresql://localhost/x", workflows=[durable.Workflow("empty")])


def test_engine_refuses_two_workflows_with_one_name() -> None:
    with pytest.raises(durable.DefinitionError, match="already registered"):
        durable.Engine("postgresql://localhost/x", workflows=[make_workflow(), make_workflow()])
    engine = durable.Engine("postgresql://localhost/x", workflows=[make_workflow()])
    with pytest.raises(durable.DefinitionError):
        engine.register(make_workflow())


def test_engine_accepts_the_same_workflow_twice() -> None:
    wf = make_workflow()
    engine = durable.Engine("postgresql://localhost/x", workflows=[wf, wf])
    engine.register(wf)
    assert engine.workflows == {"w": wf}


def test_engine_refuses_things_that_are_not_workflows() -> None:
    with pytest.raises(durable.DefinitionError):
        durable.Engine("postgresql://localhost/x", workflows=["w"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "schema", ["", "Durable", "1abc", "a-b", 'x"; DROP TABLE runs; --', "a b", "x" * 49]
)
def test_engine_refuses_an_invalid_schema_name(schema: str) -> None:
    with pytest.raises(durable.ConfigurationError):
        durable.Engine("postgresql://localhost/x", workflows=[make_workflow()], schema=schema)


def test_engine_accepts_a_valid_schema_name() -> None:
    engine = durable.Engine("postgresql://localhost/x", workflows=[make_workflow()], schema="wf_2")
    assert engine.schema == "wf_2"


def test_engine_repr_hides_the_password() -> None:
    engine = durable.Engine("postgresql://ann:s3cret@localhost/x", workflows=[make_workflow()])
    assert "s3cret" not in repr(engine)


# -- errors and public names ----------------------------------------------------------------


def test_errors_are_durable_errors() -> None:
    """Every exception class of durable.errors, not a list that could miss a new one: a
    DurableError, exported, with a docstring saying when it is raised."""
    classes = [
        value
        for value in vars(durable.errors).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == "durable.errors"
    ]
    assert len(classes) >= 19, classes
    for cls in classes:
        assert issubclass(cls, durable.DurableError), cls
        assert getattr(durable, cls.__name__) is cls, cls
        assert (cls.__doc__ or "").startswith("Raise"), cls


def test_illegal_transition_carries_the_run_and_both_statuses() -> None:
    error = durable.IllegalTransition("01RUN", "completed", "running")
    assert (error.run_id, error.from_status, error.to_status) == ("01RUN", "completed", "running")
    assert str(error) == (
        "run 01RUN cannot move from 'completed' to 'running' (the database refuses that "
        "status change)"
    )
    again = pickle.loads(pickle.dumps(error))
    assert (again.run_id, again.from_status, again.to_status, str(again)) == (
        "01RUN",
        "completed",
        "running",
        str(error),
    )


def test_run_status_values() -> None:
    assert [s.value for s in durable.RunStatus] == [
        "pending",
        "running",
        "waiting",
        "compensating",
        "completed",
        "failed",
        "cancelled",
    ]
    assert durable.RunStatus("failed") == "failed"
    assert {s for s in durable.RunStatus if s.terminal} == {
        durable.RunStatus.COMPLETED,
        durable.RunStatus.FAILED,
        durable.RunStatus.CANCELLED,
    }


def test_all_names_exist() -> None:
    assert len(durable.__all__) == len(set(durable.__all__))
    for name in durable.__all__:
        assert hasattr(durable, name), name


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(durable).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(durable.__all__)


def test_the_contract_names_are_exported() -> None:
    for name in (
        "Workflow",
        "Engine",
        "Context",
        "Run",
        "RunStatus",
        "DurableError",
        "DefinitionError",
        "WorkflowNotFound",
        "RunNotFound",
        "SerializationError",
        "RunFailed",
        "RunCancelled",
        "NonRetryable",
    ):
        assert name in durable.__all__, name
