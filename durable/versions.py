"""Versions and deploys: which unfinished runs this code can continue (`check`), moving runs
to another version or shape (`upgrade`), and what a worker says at start about runs it
leaves waiting.

Theory of operation. A run is pinned at start to its workflow's name, version and shape,
all three held by its `queue` (`Workflow.queue`); workers claim only queues they
registered, so the claim needs nothing more. The shape of every queue is recorded in the
`shapes` table, which is what lets this module compare the runs in the database with the
code in hand. The rules are pure functions (`ShapeDiff.between`, `upgrade_position`); the
I/O around them is one query for `check` and one transaction per run for `upgrade`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import asyncpg

from durable.db import Connection
from durable.sql import Queries
from durable.workflow import Workflow

log = logging.getLogger("durable.versions")

#: A shape: each node's name, kind and branch keys, in declaration order.
Shape = tuple[tuple[str, str, tuple[str, ...]], ...]

#: Why `check` found a run that this code cannot continue.
Cause = Literal["unknown_workflow", "unknown_version", "shape_changed"]

CAUSES: dict[Cause, str] = {
    "unknown_workflow": "workflow not registered",
    "unknown_version": "version not registered",
    "shape_changed": "shape changed without a version bump",
}

# An upgrade's transaction waits this long for a lock (a node in flight on the run) before
# it gives up and tries again; after the last try the run is refused as busy.
LOCK_TIMEOUT = "5s"
TRIES = 3


def parse_shape(text: str | None) -> Shape | None:
    """A shape as the `shapes` table holds it (JSON), or None when none is recorded."""
    if text is None:
        return None
    return tuple((str(n[0]), str(n[1]), tuple(n[2])) for n in json.loads(text))


# -- comparing shapes -----------------------------------------------------------------------


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


# -- check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrandedRuns:
    """Unfinished runs of one queue (workflow, version, shape) that the checked code cannot
    continue, and why: `cause` is `"unknown_workflow"` (no version of the workflow is
    registered), `"unknown_version"` (the workflow is, not that version) or
    `"shape_changed"` (that version is registered with another shape: a node list changed
    without a version bump; `diff` says how, or is None when the runs' shape is not
    recorded)."""

    cause: Cause
    workflow: str
    version: int
    queue: str
    run_ids: tuple[str, ...]
    diff: ShapeDiff | None = None

    def as_dict(self) -> dict[str, Any]:
        """The group as JSON-ready data."""
        return {
            "cause": self.cause,
            "workflow": self.workflow,
            "version": self.version,
            "queue": self.queue,
            "runs": len(self.run_ids),
            "run_ids": list(self.run_ids),
            "diff": None if self.diff is None else self.diff.as_dict(),
        }


@dataclass(frozen=True)
class CheckReport:
    """What `Engine.check()` found: of the `unfinished` runs in the database,
    `continuable` can be continued by the engine's registered workflows; every other one
    is listed in `stranded`, grouped by cause and queue. `ok` is True when none is."""

    unfinished: int
    continuable: int
    stranded: tuple[StrandedRuns, ...] = ()

    @property
    def ok(self) -> bool:
        """True when this code can continue every unfinished run."""
        return not self.stranded

    def by_cause(self) -> dict[Cause, list[StrandedRuns]]:
        """The stranded groups under each cause that has any, in the order of `CAUSES`."""
        found: dict[Cause, list[StrandedRuns]] = {}
        for cause in CAUSES:
            groups = [g for g in self.stranded if g.cause == cause]
            if groups:
                found[cause] = groups
        return found

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what `durable check --json` prints)."""
        return {
            "ok": self.ok,
            "unfinished": self.unfinished,
            "continuable": self.continuable,
            "stranded": sum(len(g.run_ids) for g in self.stranded),
            "causes": {
                cause: [g.as_dict() for g in groups] for cause, groups in self.by_cause().items()
            },
        }


def registered_by_name(workflows: Iterable[Workflow]) -> dict[str, dict[int, Workflow]]:
    """The workflows by name, then version."""
    found: dict[str, dict[int, Workflow]] = {}
    for wf in workflows:
        found.setdefault(wf.name, {})[wf.version] = wf
    return found


def classify(
    versions: Mapping[str, Mapping[int, Workflow]], row: asyncpg.Record | Mapping[str, Any]
) -> StrandedRuns:
    """Why the runs of one unserved queue (a `check_runs` row) cannot be continued."""
    ids = tuple(row["ids"])
    registered = versions.get(row["workflow"])
    if not registered:
        return StrandedRuns("unknown_workflow", row["workflow"], row["version"], row["queue"], ids)
    wf = registered.get(row["version"])
    if wf is None:
        return StrandedRuns("unknown_version", row["workflow"], row["version"], row["queue"], ids)
    old = parse_shape(row["shape"])
    diff = None if old is None else ShapeDiff.between(old, wf.shape)
    return StrandedRuns("shape_changed", row["workflow"], row["version"], row["queue"], ids, diff)


async def check(conn: Connection, q: Queries, workflows: Sequence[Workflow]) -> CheckReport:
    """For every unfinished run in the database: can `workflows` continue it?"""
    served = {wf.queue for wf in workflows}
    versions = registered_by_name(workflows)
    rows = await conn.fetch(q["check_runs"], sorted(served))
    unfinished = sum(r["runs"] for r in rows)
    stranded = [classify(versions, r) for r in rows if r["queue"] not in served]
    order = list(CAUSES)
    stranded.sort(key=lambda g: (order.index(g.cause), g.workflow, g.version, g.queue))
    return CheckReport(
        unfinished=unfinished,
        continuable=unfinished - sum(len(g.run_ids) for g in stranded),
        stranded=tuple(stranded),
    )


# -- the warning at worker start ------------------------------------------------------------


async def announce(conn: Connection, q: Queries, workflows: Sequence[Workflow]) -> None:
    """Log the unfinished runs of the worker's workflows that it leaves waiting: a warning
    for each version whose shape changed while runs of the old shape are unfinished, a
    line of information for runs of versions this worker does not register."""
    versions = registered_by_name(workflows)
    served = sorted(wf.queue for wf in workflows)
    for row in await conn.fetch(q["unserved_runs"], sorted(versions), served):
        name, version, runs = row["workflow"], row["version"], row["runs"]
        fields = {"workflow": name, "version": version, "queue": row["queue"], "runs": runs}
        wf = versions[name].get(version)
        if wf is None:
            log.info(
                "%d unfinished run(s) of workflow %r version %d wait for a worker that "
                "registers that version (this worker registers version(s) %s)",
                runs,
                name,
                version,
                ", ".join(map(str, sorted(versions[name]))),
                extra=fields,
            )
            continue
        old = parse_shape(row["shape"])
        diff = (
            "its old shape is not recorded"
            if old is None
            else str(ShapeDiff.between(old, wf.shape))
        )
        log.warning(
            "workflow %r version %d changed shape (%s) while %d unfinished run(s) use the old "
            "one: this worker serves the new shape and leaves them waiting for a worker with "
            "the old definition. Keep the old code running, bump the version, or run "
            "`durable check`",
            name,
            version,
            diff,
            runs,
            extra=fields,
        )


# -- upgrade --------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class UpgradeRefusal:
    """A run `upgrade` did not move, and why."""

    run_id: str
    reason: str


@dataclass(frozen=True)
class UpgradeReport:
    """What `Engine.upgrade()` did: the runs it `moved` to `to_version` (with `dry_run`,
    the runs it would move) and those it `refused`, each with its reason."""

    workflow: str
    from_version: int
    to_version: int
    dry_run: bool
    moved: tuple[str, ...] = ()
    refused: tuple[UpgradeRefusal, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what `durable runs upgrade --json` prints)."""
        return {
            "workflow": self.workflow,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "dry_run": self.dry_run,
            "moved": len(self.moved),
            "moved_ids": list(self.moved),
            "refused": [{"run_id": r.run_id, "reason": r.reason} for r in self.refused],
        }


async def upgrade_one(
    conn: Connection, q: Queries, run_id: str, from_version: int, target: Workflow, dry_run: bool
) -> int | str | None:
    """Decide and apply the upgrade of one run in one transaction: its new cursor when it
    moved (or would), the reason when refused, None when there is nothing to do (it
    finished, or is no longer at `from_version`, meanwhile)."""
    for attempt in range(1, TRIES + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                row = await conn.fetchrow(q["lock_for_upgrade"], run_id)
                if (
                    row is None
                    or row["finished"]
                    or row["version"] != from_version
                    or row["queue"] == target.queue
                ):
                    return None
                branches = row["branches"]
                position = Position(
                    current_node=row["current_node"],
                    branches=None if branches is None else tuple(branches),
                    leased=row["leased"],
                    journaled=tuple(row["journaled"]),
                    chosen=row["chosen"],
                )
                verdict = upgrade_position(position, parse_shape(row["shape"]), target)
                if isinstance(verdict, int) and not dry_run:
                    await conn.execute(
                        q["upgrade_run"], run_id, row["queue"], target.queue, verdict
                    )
                return verdict
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            if attempt == TRIES:
                return f"busy: transactions on it held locks for over {LOCK_TIMEOUT}; try again"
            await anyio.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


async def upgrade(
    conn: Connection, q: Queries, from_version: int, target: Workflow, dry_run: bool
) -> UpgradeReport:
    """Move the unfinished runs of `target`'s workflow at `from_version` (other than those
    already on `target`'s queue) to `target`, each in its own transaction."""
    ids = [
        r["id"]
        for r in await conn.fetch(q["upgrade_candidates"], target.name, from_version, target.queue)
    ]
    moved: list[str] = []
    refused: list[UpgradeRefusal] = []
    for run_id in ids:
        verdict = await upgrade_one(conn, q, run_id, from_version, target, dry_run)
        if isinstance(verdict, int):
            moved.append(run_id)
        elif verdict is not None:
            refused.append(UpgradeRefusal(run_id, verdict))
    report = UpgradeReport(
        workflow=target.name,
        from_version=from_version,
        to_version=target.version,
        dry_run=dry_run,
        moved=tuple(moved),
        refused=tuple(refused),
    )
    log.info(
        "%s %d run(s) of workflow %r from version %d to version %d (%s); refused %d",
        "would move" if dry_run else "moved",
        len(report.moved),
        target.name,
        from_version,
        target.version,
        target.queue,
        len(report.refused),
        extra={"workflow": target.name, "moved": len(report.moved)},
    )
    return report
