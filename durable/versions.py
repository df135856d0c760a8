"""Versions and deploys: which unfinished runs this code can continue (`check`), moving runs
to another version or shape (`upgrade`), and what a worker says at start about runs it
leaves waiting.

Theory of operation. A run is pinned at start to its workflow's name, version and shape,
all three held by its `queue` (`Workflow.queue`); workers claim only queues they
registered, so the claim needs nothing more. The shape of every queue is recorded in the
`shapes` table, which is what lets this module compare the runs in the database with the
code in hand. The rules are pure functions (`ShapeDiff.between`, `upgrade_position`, in
`durable.shapes`); the I/O around them is one query for `check` and one transaction per
run for `upgrade`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import asyncpg

from durable.db import Connection
from durable.shapes import Position, ShapeDiff, parse_shape, upgrade_position
from durable.shapes import Shape as Shape
from durable.sql import Queries
from durable.workflow import Workflow

log = logging.getLogger("durable.versions")

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
