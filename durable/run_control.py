"""The client's pause/resume, limit usage, cancel, retry, purge, check and upgrade."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from durable.arguments import age_arg, count_arg, run_id_arg, text_arg
from durable.context import current_run
from durable.db import Connection
from durable.errors import ArgumentError, RunNotFound
from durable.sql import Queries
from durable.versions import CheckReport, UpgradeReport
from durable.versions import check as check_runs
from durable.versions import upgrade as upgrade_runs
from durable.workflow import Workflow

log = logging.getLogger("durable.engine")


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """What a named limit uses now for one key (`Engine.limit_usage`): `in_flight` attempts
    hold a slot, of `slots` there are so far; `tokens` rate tokens exist, the last taken at
    `last_start` (None if never)."""

    name: str
    key: str
    in_flight: int
    slots: int
    tokens: int
    last_start: datetime | None


class RunControl:
    """Flow control, cancel, retry, purge, check and upgrade, for the engine's client
    operations (`durable.client.Client`)."""

    queries: Queries

    def _acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        raise NotImplementedError

    def _registered(self) -> list[Workflow]:
        raise NotImplementedError

    def _workflow(self, workflow: str | Workflow, version: int | None = None) -> Workflow:
        raise NotImplementedError

    async def _record_shapes(
        self, conn: Connection, workflows: list[Workflow], *, force: bool = False
    ) -> None:
        raise NotImplementedError

    # -- flow control ----------------------------------------------------------------------

    async def pause(self, workflow: str | Workflow) -> bool:
        """Stop workers from claiming the jobs of `workflow` (any name: it need not be
        registered here). Attempts in flight finish; runs keep their state and jobs, and new
        runs can still be started. Returns False if it was paused already."""
        name = self._flow_name(workflow)
        async with self._acquire() as conn:
            changed: bool = await conn.fetchval(self.queries["pause_workflow"], name)
        if changed:
            log.info("workflow %s paused", name, extra={"workflow": name})
        return changed

    async def resume(self, workflow: str | Workflow) -> bool:
        """Let workers claim the jobs of a paused `workflow` again (idle workers are woken).
        Returns False if it was not paused."""
        name = self._flow_name(workflow)
        async with self._acquire() as conn:
            changed: bool = await conn.fetchval(self.queries["resume_workflow"], name)
        if changed:
            log.info("workflow %s resumed", name, extra={"workflow": name})
        return changed

    async def paused(self) -> list[str]:
        """The names of the paused workflows."""
        async with self._acquire() as conn:
            return [r["workflow"] for r in await conn.fetch(self.queries["paused_workflows"])]

    async def limit_usage(self) -> list[LimitUsage]:
        """What each named limit uses now, per key (keys that were never used are absent)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(self.queries["limit_usage"])
        return [LimitUsage(**dict(r)) for r in rows]

    def _flow_name(self, workflow: str | Workflow) -> str:
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ArgumentError(f"workflow must be a name or a Workflow, got {workflow!r}")
        return name

    # -- cancelling ------------------------------------------------------------------------

    async def cancel(self, run_id: str, *, reason: str = "cancelled") -> bool:
        """Cancel a pending, running or waiting run and its unfinished children: completed
        steps are compensated and it ends `cancelled`. Returns False if the run had already
        finished or was compensating; raises `RunNotFound`.

        A node in flight commits first (the cancel waits for its transaction; claims of the
        run's next node leave it to the cancel). Called from a handler of the run itself, it
        records the request and returns at once: the cancel takes effect when the node
        commits. All of it commits in one transaction: an interrupted cancel leaves nothing.
        """
        run_id = run_id_arg(run_id)
        text_arg(reason, "reason")
        async with self._acquire() as conn:
            if current_run.get() == run_id:
                requested = await conn.fetchval(self.queries["request_cancel"], run_id, reason)
                if (
                    requested is None
                    and await conn.fetchval(self.queries["run_status"], run_id) is None
                ):
                    raise RunNotFound(f"no run with id {run_id!r}")
                return requested is not None
            done: bool | None = await conn.fetchval(self.queries["cancel"], run_id, reason)
        if done is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        if done:
            log.info("run %s cancelled", run_id, extra={"run_id": run_id})
        return done

    # -- retry and purge -------------------------------------------------------------------

    async def retry(self, run_id: str) -> bool:
        """Resume a failed run: re-run the node that failed and every step whose compensator
        ran (a fresh attempt budget for each); every other completed node is replayed from
        its journal. Returns False if the run is not `failed`; raises `RunNotFound`.
        """
        run_id = run_id_arg(run_id)
        async with self._acquire() as conn:
            await self._record_shapes(conn, self._registered())
            # A run whose shape no engine recorded: ConfigurationError (durable.db.translate).
            done: bool | None = await conn.fetchval(self.queries["retry_run"], run_id)
        if done is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        if done:
            log.info("run %s retried", run_id, extra={"run_id": run_id})
        return done

    async def purge(self, *, older_than: timedelta, batch_size: int = 1000) -> int:
        """Delete runs that finished more than `older_than` ago, with their journal, attempts
        and mailbox, in batches of `batch_size`; return how many runs were deleted."""
        seconds = age_arg(older_than, "older_than")
        count_arg(batch_size, "batch_size")
        total = 0
        while True:
            async with self._acquire() as conn:
                rows = await conn.fetch(self.queries["purge_candidates"], seconds, batch_size)
                ids = [r["id"] for r in rows]
                n: int = await conn.fetchval(self.queries["purge"], ids) if ids else 0
            total += n
            if len(ids) < batch_size or n == 0:
                break
        log.info(
            "purged %d runs finished more than %s ago", total, older_than, extra={"purged": total}
        )
        return total

    # -- versions --------------------------------------------------------------------------

    async def check(self) -> CheckReport:
        """For every unfinished run in the database, can this engine's code continue it?

        A run is continuable when its workflow, version and shape are registered here. The
        report lists every other run, grouped by cause: its workflow is not registered, its
        version is not, or that version is registered with another shape (a node list
        changed without a version bump). Nothing is written. `durable check` prints it
        and exits 1 unless `report.ok`, to gate a deploy.
        """
        async with self._acquire() as conn:
            return await check_runs(conn, self.queries, self._registered())

    async def upgrade(
        self,
        workflow: str | Workflow,
        *,
        from_version: int,
        to_version: int | None = None,
        dry_run: bool = False,
    ) -> UpgradeReport:
        """Move the unfinished runs of `workflow` at `from_version` to `to_version` as
        registered here (default: the highest), with its current shape; `from_version` may
        equal `to_version`, to move runs of an older shape of that version (a node list
        changed without a bump).

        A run moves when, and only when, every node its journal names is declared by the
        target before the run's position with the same kind, and the node at its position
        has the same name and kind (a parallel node that fanned out keeps its branch keys,
        a route that chose keeps the chosen branch). The others are refused, each with its
        reason. Each run moves in a transaction of its own, under the locks a cancel takes,
        so workers may run meanwhile: a node in flight commits first. With `dry_run`,
        nothing is written and the report says what would move. A `Workflow` passed as
        `workflow` is the target itself.
        """
        target = self._workflow(workflow, to_version)
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise ArgumentError(f"from_version must be an integer >= 1, got {from_version!r}")
        async with self._acquire() as conn:
            await self._record_shapes(conn, [target], force=True)
            return await upgrade_runs(conn, self.queries, from_version, target, dry_run)
