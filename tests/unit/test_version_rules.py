"""Versions without a database: `Workflow(version=)`, queues, registering versions, shape
diffs and the upgrade rule (durable/versions.py, durable/shapes.py)."""

from __future__ import annotations

from typing import Any

import pytest

import durable
from durable.shapes import Position, ShapeDiff, upgrade_position


async def _noop(ctx: durable.Context) -> None:
    return None


def wf(version: int, *nodes: str, name: str = "order") -> durable.Workflow:
    """Steps, except `wait*` (signal waits), `s:sleep` (sleeps) and `p=x+y` (parallel)."""
    w = durable.Workflow(name, version=version)
    for spec in nodes:
        node, _, kind = spec.partition(":")
        if "=" in node:
            node, keys = node.split("=")
            if node.startswith("p"):
                w.parallel(node, dict.fromkeys(keys.split("+"), _noop))
            else:
                w.route(node, lambda ctx: "x", dict.fromkeys(keys.split("+"), _noop))
        elif kind == "sleep":
            w.sleep(node, 1)
        elif node.startswith("wait"):
            w.wait_for_signal(node, "go")
        else:
            w.step(node, _noop)
    return w


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5, None])
def test_a_version_is_an_integer_of_at_least_one(bad: Any) -> None:
    with pytest.raises(durable.DefinitionError, match="version must be an integer >= 1"):
        durable.Workflow("order", version=bad)


def test_the_queue_names_the_workflow_the_version_and_the_shape() -> None:
    v1, v2, v2_again = wf(1, "a", "b"), wf(2, "a", "b"), wf(2, "a", "b")
    digest = v1.queue.split("@")[1]
    assert v1.queue == f"order@{digest}"  # as before versions existed
    assert v2.queue == f"order@v2@{digest}"
    assert v2_again.queue == v2.queue  # handler code is not part of it
    assert wf(2, "a", "c").queue != v2.queue
    assert wf(2, "a", "p=x+y").queue != wf(2, "a", "p=x+z").queue
    assert durable.Workflow("order").version == 1
    assert "version=2" in repr(v2)


def test_an_engine_serves_every_registered_version_and_refuses_a_pair_twice() -> None:
    v1, v3 = wf(1, "a"), wf(3, "a")
    engine = durable.Engine("postgresql://u@localhost/x", workflows=[v3, v1, wf(1, "b", name="b")])
    assert engine.workflows["order"] is v3
    assert list(engine.versions["order"].items()) == [(1, v1), (3, v3)]
    engine.register(v1)  # the same object again is fine
    with pytest.raises(durable.DefinitionError, match="'order' version 1 is already registered"):
        engine.register(wf(1, "a"))


def test_a_shape_diff_names_nodes_added_removed_and_changed() -> None:
    old = wf(1, "a", "b", "p=x+y", "c", "d").shape
    new = wf(1, "a", "b:sleep", "p=x+y+z", "d", "c", "e").shape
    diff = ShapeDiff.between(old, new)
    assert diff.added == ("e",)
    assert diff.removed == ()
    assert diff.changed == (
        ("b", "step -> sleep"),
        ("p", "branches ['x', 'y'] -> ['x', 'y', 'z']"),
        ("d", "moved"),
        ("c", "moved"),
    )
    assert str(diff) == (
        "added e; changed b (step -> sleep), p (branches ['x', 'y'] -> ['x', 'y', 'z']), "
        "d (moved), c (moved)"
    )
    assert str(ShapeDiff.between(new, wf(1, "a").shape)).startswith("removed b, p, d, c, e")
    assert str(ShapeDiff.between(old, old)) == "no node changed"


def at(node: str, *journaled: str, **kw: Any) -> Position:
    return Position(
        current_node=node,
        branches=kw.get("branches"),
        leased=kw.get("leased", False),
        journaled=journaled,
        chosen=kw.get("chosen"),
    )


SOURCE = wf(1, "a", "b", "wait", "p=x+y", "r=x+y", "c").shape


@pytest.mark.parametrize(
    ("position", "target", "expected"),
    [
        (at("wait", "a", "b"), ("a", "b", "wait", "p=x+y", "c", "d"), 2),
        (at("wait", "a", "b"), ("n", "a", "b", "wait"), 3),
        (at("wait", "b", "a"), ("b", "a", "wait"), 2),  # journal order does not matter
        (at("a"), ("a",), 0),
        (at("wait", "a", "b"), ("a", "wait"), "journaled node 'b' is not declared by version 2"),
        (
            at("wait", "a", "b"),
            ("a", "b:sleep", "wait"),
            "journaled node 'b' is a step but a sleep in version 2",
        ),
        (
            at("wait", "a", "b"),
            ("a", "wait", "b"),
            "journaled node 'b' comes after its position 'wait' in version 2",
        ),
        (
            at("wait", "a", "b"),
            ("a", "b", "c"),
            "its position, node 'wait', is not declared by version 2",
        ),
        (
            at("wait", "a", "b"),
            ("a", "b", "wait:sleep"),
            "node 'wait' at its position is a wait_for_signal but a sleep in version 2",
        ),
        (at("p", "a", "b", "wait", "p"), ("a", "b", "wait", "p=x+y+z"), 3),  # not fanned out
        (
            at("p", "a", "b", "wait", "p", branches=("x", "y")),
            ("a", "b", "wait", "p=x+y+z"),
            "parallel 'p' fanned out branches ['x', 'y'], but version 2 declares ['x', 'y', 'z']",
        ),
        (at("p", "a", branches=("x", "y")), ("a", "p=y+x"), 1),
        (at("r", "a", "r", chosen="x"), ("a", "r=x+z"), 1),
        (
            at("r", "a", "r", chosen="x"),
            ("a", "r=y+z"),
            "route 'r' chose branch 'x', which version 2 does not declare",
        ),
        (
            at("c", "a", leased=True),
            ("a", "c"),
            "a transactional=False attempt is in flight; upgrade it once that settles",
        ),
    ],
)
def test_the_upgrade_rule(position: Position, target: tuple[str, ...], expected: Any) -> None:
    assert upgrade_position(position, SOURCE, wf(2, *target)) == expected


def test_a_run_whose_shape_is_not_recorded_is_not_upgraded() -> None:
    assert (
        upgrade_position(at("a"), None, wf(2, "a"))
        == "the shape it was started with is not recorded"
    )
