"""Workflow shapes compared: how one differs from another, and where a run may move (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from durable.workflow import Workflow

#: A shape: each node's name, kind and branch keys, in declaration order.
Shape = tuple[tuple[str, str, tuple[str, ...]], ...]


def parse_shape(text: str | None) -> Shape | None:
    """A shape as the `shapes` table holds it (JSON), or None when none is recorded."""
    if text is None:
        return None
    return tuple((str(n[0]), str(n[1]), tuple(n[2])) for n in json.loads(text))


@dataclass(frozen=True)
class ShapeDiff:
    """How one shape of a workflow differs from another: node names `added` and `removed`,
    and nodes `changed` (another kind, other branch keys, or another place among the nodes
    both declare), each with a note saying how."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[str, str], ...] = ()

    @classmethod
    def between(cls, old: Shape, new: Shape) -> ShapeDiff:
        """What changed from shape `old` to shape `new`."""
        before = {name: (kind, branches) for name, kind, branches in old}
        after = {name: (kind, branches) for name, kind, branches in new}
        kept_old = [n for n, _, _ in old if n in after]
        kept_new = [n for n, _, _ in new if n in before]
        changed: list[tuple[str, str]] = []
        for name in kept_new:
            (kind, branches), (new_kind, new_branches) = before[name], after[name]
            if kind != new_kind:
                changed.append((name, f"{kind} -> {new_kind}"))
            elif branches != new_branches:
                changed.append((name, f"branches {list(branches)} -> {list(new_branches)}"))
            elif kept_old.index(name) != kept_new.index(name):
                changed.append((name, "moved"))
        return cls(
            added=tuple(n for n, _, _ in new if n not in before),
            removed=tuple(n for n, _, _ in old if n not in after),
            changed=tuple(changed),
        )

    def __str__(self) -> str:
        parts = []
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed))
        if self.changed:
            parts.append("changed " + ", ".join(f"{n} ({how})" for n, how in self.changed))
        return "; ".join(parts) or "no node changed"

    def as_dict(self) -> dict[str, Any]:
        """The diff as JSON-ready data."""
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [{"node": n, "how": how} for n, how in self.changed],
        }


@dataclass(frozen=True)
class Position:
    """Where an unfinished run is, as `lock_for_upgrade_v1` read it under its locks."""

    current_node: str | None
    branches: tuple[str, ...] | None
    leased: bool
    journaled: tuple[str, ...]
    chosen: str | None


def upgrade_position(run: Position, source: Shape | None, target: Workflow) -> int | str:
    """The run's cursor in `target` if it may move there, else why not.

    The rule (docs/guides/deploying.md): every node the run's journal names is declared by
    the target, before the run's position, with the same kind, and the node at the
    position has the same name and kind. At that node, a parallel node that has fanned out
    needs the same branch keys, and a route that has chosen needs the chosen branch. A run
    whose `transactional=False` step is in flight (leased) waits for it to settle.
    """
    to = f"version {target.version}"
    if run.leased:
        return "a transactional=False attempt is in flight; upgrade it once that settles"
    if source is None:
        return "the shape it was started with is not recorded"
    if run.current_node is None:
        return "it has no position"
    kinds = {name: kind for name, kind, _ in source}
    position = target.position(run.current_node)
    if position is None:
        return f"its position, node {run.current_node!r}, is not declared by {to}"
    node = target.nodes[position]
    kind = kinds.get(run.current_node)
    if node.kind != kind:
        return f"node {run.current_node!r} at its position is a {kind} but a {node.kind} in {to}"
    for name in run.journaled:
        if name == run.current_node:
            continue
        at = target.position(name)
        if at is None:
            return f"journaled node {name!r} is not declared by {to}"
        if target.nodes[at].kind != kinds.get(name):
            return (
                f"journaled node {name!r} is a {kinds.get(name)} but a "
                f"{target.nodes[at].kind} in {to}"
            )
        if at > position:
            return f"journaled node {name!r} comes after its position {run.current_node!r} in {to}"
    branches = tuple(getattr(node, "branches", None) or ())
    if node.kind == "parallel" and run.branches is not None and set(run.branches) != set(branches):
        return (
            f"parallel {node.name!r} fanned out branches {sorted(run.branches)}, but {to} "
            f"declares {sorted(branches)}"
        )
    if node.kind == "route" and run.chosen is not None and run.chosen not in branches:
        return f"route {node.name!r} chose branch {run.chosen!r}, which {to} does not declare"
    return position
