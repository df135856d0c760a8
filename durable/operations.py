"""Operator actions on runs: pause and resume, fork, and cancel or retry many at once.

Like the rest of the client side, each action is one call of a function of
sql/functions.sql that ends by giving the run exactly the jobs its state needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from ulid import ULID

from durable.client import Client
from durable.codec import input_text
from durable.errors import ArgumentError, ArgumentTypeError, ConfigurationError, RunNotFound
from durable.model import RunStatus

log = logging.getLogger("durable.engine")

_UNFINISHED = ("pending", "running", "waiting")


@dataclass(frozen=True)
class RunFilter:
    """Which runs a bulk action (`Engine.cancel_runs`, `Engine.retry_runs`) takes: the
    filters of `Engine.list_runs`. At least one must be set, so that a forgotten filter
    never cancels every run."""

    status: RunStatus | str | None = None
    workflow: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    search: str | None = None

    def args(self) -> tuple[Any, ...]:
        status = RunStatus(self.status).value if self.status is not None else None
        return (status, self.workflow, self.created_after, self.created_before, self.search)

    @property
    def empty(self) -> bool:
        """True when no filter is set."""
        return all(v is None for v in self.args())


class Operations(Client):
    """Operator actions of an `Engine`."""

    async def pause_run(self, run_id: str) -> bool:
        """Pause a run: it keeps its state and no worker claims it until `resume_run`.

        A node in flight commits first (the pause waits for its transaction). Signals sent
        meanwhile are kept in the mailbox; a timer that falls due waits for the resume.
        Returns False when the run had finished or was paused already; raises `RunNotFound`.
        """
        async with self._acquire() as conn:
            done: bool | None = await conn.fetchval(self.queries["pause_run"], run_id)
        if done is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        if done:
            log.info("run %s paused", run_id, extra={"run_id": run_id})
        return done

    async def resume_run(self, run_id: str) -> bool:
        """Resume a paused run where it was. Returns False when it was not paused (or has
        finished); raises `RunNotFound`."""
        async with self._acquire() as conn:
            done: bool | None = await conn.fetchval(self.queries["resume_run"], run_id)
        if done is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        if done:
            log.info("run %s resumed", run_id, extra={"run_id": run_id})
        return done

    async def fork(
        self,
        run_id: str,
        from_node: str | None = None,
        input: Any = None,
    ) -> str:
        """Start a new run of the same workflow (and shape) as `run_id` that keeps the
        original's journal before `from_node` and runs from that node on; return its id.

        `from_node` defaults to the node that failed (for an unfinished run, the node it is
        at). `input` replaces the original's input (a mapping, or an instance of the
        workflow's `input=` model, validated as `start` does). Every node before
        `from_node` must have completed in the original: their results replay, and what the
        original's compensations undid is not part of the fork (fork from the first step
        they undid to run it again). The original is left as it is. Raises `RunNotFound`, and
        `ArgumentError` for a node the workflow does not declare or the run has not reached.
        """
        if from_node is not None and (not isinstance(from_node, str) or not from_node):
            raise ArgumentError(f"from_node must be a node name, got {from_node!r}")
        text = None
        new_id = str(ULID())
        async with self._acquire() as conn:
            if input is not None:
                # Validated as a start's input: against the workflow's `input=` model, when
                # this engine registers the run's workflow and it has one.
                run = await conn.fetchrow(self.queries["run_queue"], run_id)
                wf = None if run is None else self._by_queue(run["queue"])
                codec = None if wf is None else wf.input_codec
                text = input_text(codec, input, f"input of the fork of run {run_id}")
            await self._record_shapes(conn, self._registered())
            try:
                forked = await conn.fetchval(
                    self.queries["fork_run"], run_id, new_id, from_node, text
                )
            except asyncpg.PostgresError as exc:
                if exc.sqlstate in ("DU020", "DU021"):
                    detail = f" (its nodes: {exc.detail})" if exc.detail else ""
                    raise ArgumentError(exc.message.removeprefix("durable: ") + detail) from None
                if exc.sqlstate == "DU002":
                    raise ConfigurationError(exc.message) from None
                raise
        if forked is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        log.info(
            "run %s forked from run %s",
            new_id,
            run_id,
            extra={"run_id": new_id, "forked_from": run_id, "node": from_node},
        )
        return new_id

    async def cancel_runs(
        self, where: RunFilter, *, reason: str = "cancelled", batch_size: int = 100
    ) -> list[str]:
        """Cancel every pending, running or waiting run that `where` matches, `batch_size`
        runs per transaction (each with its children, as `cancel` does); return the ids of
        the runs cancelled, newest first."""
        if not isinstance(reason, str) or "\x00" in reason:
            raise ArgumentError("reason must be a string without NUL")
        return await self._bulk(where, _UNFINISHED, "bulk_cancel", (reason,), batch_size)

    async def retry_runs(self, where: RunFilter, *, batch_size: int = 100) -> list[str]:
        """Retry every failed run that `where` matches (as `retry` does), `batch_size` runs
        per transaction; return the ids of the runs retried, newest first."""
        async with self._acquire() as conn:
            await self._record_shapes(conn, self._registered())
        return await self._bulk(where, ("failed",), "bulk_retry", (), batch_size)

    async def matching_runs(
        self, where: RunFilter, statuses: tuple[str, ...] = ("pending", "running", "waiting")
    ) -> list[str]:
        """The ids of the runs that `where` matches whose status is one of `statuses`,
        newest first: what a bulk action would take (a dry run)."""
        return await self._bulk(where, statuses, None, (), 1000)

    async def _bulk(
        self,
        where: RunFilter,
        statuses: tuple[str, ...],
        query: str | None,
        extra: tuple[Any, ...],
        batch_size: int,
    ) -> list[str]:
        """Walk the matching runs in batches (keyset on the id); apply `query` to each
        batch in its transaction, or with no query only collect them."""
        if not isinstance(where, RunFilter):
            raise ArgumentTypeError(f"expected a durable.RunFilter, got {where!r}")
        if where.empty:
            raise ArgumentError("a bulk action needs at least one filter (status, workflow...)")
        if batch_size < 1:
            raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
        status, workflow, after, before_time, search = where.args()
        done: list[str] = []
        cursor: str | None = None
        while True:
            async with self._acquire() as conn, conn.transaction():
                await conn.execute(self.queries["custom_plans"])
                rows = await conn.fetch(
                    self.queries["bulk_candidates"],
                    status,
                    workflow,
                    batch_size,
                    after,
                    before_time,
                    search,
                    cursor,
                    list(statuses),
                )
                ids = [r["id"] for r in rows]
                if not ids:
                    break
                if query is None:
                    acted = set(ids)
                else:
                    # One lock order for every bulk action: ascending ids.
                    found = await conn.fetch(self.queries[query], sorted(ids), *extra)
                    acted = {r["id"] for r in found}
            done += [i for i in ids if i in acted]
            cursor = ids[-1]
            if len(ids) < batch_size:
                break
        if query is not None:
            log.info("%s: %d run(s)", query.replace("_", " "), len(done), extra={"runs": len(done)})
        return done
