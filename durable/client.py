"""The client side: start, inspect, wait for, signal, cancel, retry, purge, check and
upgrade runs (waiting is in `durable.waiting`, the operations from pausing a workflow to
upgrading runs in `durable.run_control`).

It shares the SQL functions with the runtime, not Python state: every operation that
moves a run is one call of a function of sql/functions.sql, which ends by giving the run
exactly the jobs its state needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime
from typing import Any

import asyncpg
from ulid import ULID

from durable import metrics
from durable.arguments import count_arg, run_id_arg, text_arg
from durable.codec import input_text
from durable.context import current_run
from durable.db import Connection, dumps, loads, storable, translated
from durable.errors import (
    ArgumentError,
    ArgumentTypeError,
    RunNotFound,
    WorkflowNotFound,
)
from durable.flow import Debounce, check_start, concurrency_key_of
from durable.model import Attempt, JournalEntry, Run, RunStatus
from durable.run_control import LimitUsage as LimitUsage
from durable.run_control import RunControl
from durable.waiting import Waiting
from durable.workflow import WaitForSignal, Workflow

log = logging.getLogger("durable.engine")


def _run_from_record(row: asyncpg.Record) -> Run:
    return Run(
        id=row["id"],
        workflow=row["workflow"],
        version=row["version"],
        status=RunStatus(row["status"]),
        input=loads(row["input"]),
        results=loads(row["results"]) or {},
        result=loads(row["result"]),
        error=row["error"],
        current_node=row["current_node"],
        parent_id=row["parent_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        children=tuple(row["children"] or ()),
        paused=row["paused"],
        forked_from=row["forked_from"],
    )


class Client(RunControl, Waiting):
    """The run operations of an `Engine` (see there for how to build one)."""

    # name -> version -> definition; every version registered is served side by side.
    _versions: dict[str, dict[int, Workflow[Any]]]

    def __init__(self) -> None:
        super().__init__()
        self._recorded: set[str] = set()  # queues whose shape this engine recorded

    def _registered(self) -> list[Workflow]:
        """Every registered workflow, each version, by name then version."""
        return [
            wf for name in sorted(self._versions) for _, wf in sorted(self._versions[name].items())
        ]

    def _workflow(self, workflow: str | Workflow, version: int | None = None) -> Workflow:
        """The registered definition of `workflow` at `version` (default: the highest
        registered; a `Workflow` stands for its own version)."""
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise ArgumentError(f"version must be an integer >= 1, got {version!r}")
        if isinstance(workflow, Workflow):
            if version is not None and version != workflow.version:
                raise ArgumentError(
                    f"version={version} contradicts the version of {workflow!r}: pass one"
                )
            name, version = workflow.name, workflow.version
        else:
            name = workflow
        versions = self._versions.get(name)
        if not versions:
            known = ", ".join(sorted(self._versions)) or "none"
            raise WorkflowNotFound(f"workflow {name!r} is not registered (registered: {known})")
        if version is None:
            return versions[max(versions)]
        found = versions.get(version)
        if found is None:
            known = ", ".join(str(v) for v in sorted(versions))
            raise WorkflowNotFound(
                f"workflow {name!r} version {version} is not registered (registered "
                f"versions: {known})"
            )
        return found

    def _by_queue(self, queue: str) -> Workflow[Any] | None:
        """The registered workflow whose jobs go to `queue` (name, version, shape), or None."""
        return next((w for w in self._registered() if w.queue == queue), None)

    async def _record_shapes(
        self, conn: Connection, workflows: list[Workflow], *, force: bool = False
    ) -> None:
        """Remember the shape of each workflow's queue in the database (retry, check and
        upgrade read it); `force` even when this engine believes it did (a start with the
        caller's `conn` may have rolled back)."""
        for wf in workflows:
            if force or wf.queue not in self._recorded:
                shape = dumps([list(map(_plain, n)) for n in wf.shape], "workflow shape")
                await conn.execute(self.queries["record_shape"], wf.queue, wf.name, shape)
                self._recorded.add(wf.queue)

    # -- runs ------------------------------------------------------------------------------

    async def start(
        self,
        workflow: str | Workflow[Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        conn: Connection | None = None,
        version: int | None = None,
        priority: int = 0,
        delay: float | None = None,
        start_at: datetime | None = None,
        singleton_key: str | None = None,
        debounce: Debounce | None = None,
    ) -> str:
        """Create a run and its first job in one transaction; return the run id (a ULID).

        The run is pinned to `version` of the workflow (default: the highest this engine
        registers; a `Workflow` passed as `workflow` stands for its own version) and to its
        shape: only workers that register that exact definition continue it. `input` is a
        mapping (a JSON object); for a workflow declared with `input=Model`, a `Model`
        instance or a mapping, validated against the model (`SerializationError` naming the
        field) and stored in its JSON form. Nothing is written unless that version is
        registered and the input is valid. With `conn`, the run commits (or rolls back) with
        the caller's transaction. With an `idempotency_key`, a second start with the same
        key returns the first run's id.

        Flow control (docs/guides/flow-control.md): `priority` (-100 to 100, higher first)
        orders every job of the run; `delay` (seconds) or `start_at` (an aware datetime)
        make its first node due then, on the database clock; while a run with the same
        `singleton_key` is active, its id is returned instead of a new run; `debounce`
        coalesces starts with the same key into one pending run with the latest input.
        A workflow with a `concurrency` bound evaluates `concurrency_key(input)` here, on
        the input's JSON form.
        """
        wf = self._workflow(workflow, version)
        text = input_text(wf.input_codec, input, f"input of workflow {wf.name!r}")
        if idempotency_key is not None:
            text_arg(idempotency_key, "idempotency_key", empty=False)
        flow = check_start(
            priority=priority,
            delay=delay,
            start_at=start_at,
            singleton_key=singleton_key,
            debounce=debounce,
            idempotency_key=idempotency_key,
        )
        key = concurrency_key_of(wf.name, wf.concurrency, wf.concurrency_key, json.loads(text))
        d = flow.debounce
        args = (
            str(ULID()),
            wf.name,
            wf.queue,
            text,
            wf.nodes[0].name,
            idempotency_key,
            flow.priority,
            flow.delay,
            flow.start_at,
            key,
            wf.concurrency,
            flow.singleton_key,
            None if d is None else d.key,
            None if d is None else d.seconds,
            None if d is None else d.max_wait,
        )
        if conn is not None:
            return await self._start(conn, wf, args)
        async with self._acquire() as c:
            return await self._start(c, wf, args)

    async def _start(self, conn: Connection, wf: Workflow, args: tuple[Any, ...]) -> str:
        with translated():  # a reused idempotency key: IdempotencyConflict
            await self._record_shapes(conn, [wf])
            run_id: str = await conn.fetchval(self.queries["start_run"], *args)
        if run_id == args[0]:
            metrics.run_started(wf.name)
            log.debug("run %s started", run_id, extra={"run_id": run_id, "workflow": wf.name})
        return run_id

    def _read_acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A connection for reads that may lag behind the primary (the engine's read
        replica, when it has one)."""
        return self._acquire()

    async def get_run(self, run_id: str, *, journal: bool = False, primary: bool = False) -> Run:
        """The run `run_id`; with `journal=True` also its journal and failed attempts, all
        read as of one moment (one snapshot), so the run is never behind its own history.

        Its input, results and journal are in their JSON form (what is stored), also for a
        workflow with an `input=` model and handlers with typed results. With
        `Engine(read_dsn=...)` it reads the replica, which may lag: a run just started may
        not be there yet (`RunNotFound`), or show an older state; `primary=True` reads the
        primary instead (to show the outcome of a change just made).
        """
        return await self._fetch_run(run_id, primary=primary, journal=journal)

    async def _fetch_run(self, run_id: str, *, primary: bool, journal: bool = False) -> Run:
        run_id = run_id_arg(run_id)
        async with self._acquire() if primary else self._read_acquire() as conn:
            if not journal:
                row = await conn.fetchrow(self.queries["get_run"], run_id)
                if row is None:
                    raise RunNotFound(f"no run with id {run_id!r}")
                return _run_from_record(row)
            # The run, its journal and its attempts as of one moment: read one by one, a
            # commit in between (a node's) would show a run behind its own journal.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await self._read_run_history(conn, run_id)

    async def _read_run_history(self, conn: Connection, run_id: str) -> Run:
        """The run with its journal and attempts, read on `conn` in the caller's snapshot
        (the dashboard's run page reads its mailbox in the same one)."""
        row = await conn.fetchrow(self.queries["get_run"], run_id)
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        run = _run_from_record(row)
        entries = tuple(
            JournalEntry(
                key=r["key"],
                node=r["node"],
                status=r["status"],
                result=loads(r["result"]),
                error=r["error"],
                attempts=r["attempts"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
            )
            for r in await conn.fetch(self.queries["get_journal"], run_id)
        )
        attempts = tuple(
            Attempt(
                key=r["key"],
                attempt=r["attempt"],
                error=r["error"],
                started_at=r["started_at"],
                failed_at=r["failed_at"],
            )
            for r in await conn.fetch(self.queries["get_attempts"], run_id)
        )
        return Run(**{**run.__dict__, "journal": entries, "attempts": attempts})

    async def list_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        search: str | None = None,
        before: str | None = None,
        version: int | None = None,
    ) -> list[Run]:
        """Runs, newest first, optionally of one status, workflow and/or version, created
        in [`created_after`, `created_before`), whose id or idempotency key is `search`.
        Pages go by keyset: `before` is the id of the last run of the previous page. With
        `Engine(read_dsn=...)` it reads the replica, which may lag behind the primary."""
        if status is not None:
            try:
                status = RunStatus(status).value
            except ValueError:
                known = ", ".join(s.value for s in RunStatus)
                raise ArgumentError(f"status must be one of {known}; got {status!r}") from None
        if workflow is not None:
            if not isinstance(workflow, str):
                raise ArgumentTypeError(
                    f"workflow must be a workflow name (str), got {type(workflow).__name__}"
                )
            if not storable(workflow):
                return []  # no workflow can have that name
        count_arg(limit, "limit")
        if version is not None:
            count_arg(version, "version")
        args = (status, workflow, limit, created_after, created_before, search, before, version)
        async with self._read_acquire() as conn, conn.transaction():
            await conn.execute(self.queries["custom_plans"])
            rows = await conn.fetch(self.queries["list_runs"], *args)
        return [_run_from_record(r) for r in rows]

    # -- signals ---------------------------------------------------------------------------

    async def signal(
        self,
        run_id: str,
        name: str,
        payload: Any = None,
        *,
        dedupe_key: str | None = None,
        conn: Connection | None = None,
    ) -> bool:
        """Send signal `name` with `payload` to a run's mailbox.

        The first `wait_for_signal` for that name consumes it (oldest first), whether it is
        already waiting (it is woken in this transaction) or reaches the wait later. Returns
        True when recorded, False when the run has finished or is compensating (no wait would
        ever consume it); raises `RunNotFound`. With `conn`, the signal commits with the
        caller's transaction. A transaction in flight on the run (a node's) commits first.

        `dedupe_key`: the run records one signal per key, however often it is sent (a
        webhook delivered twice, a client retrying after a timeout): a later signal with a
        key the run's mailbox already holds, consumed or not, records nothing and returns
        True, also once the run has finished (a retried request gets the first answer).
        The first one's name and payload stand.
        """
        run_id = run_id_arg(run_id)
        text_arg(name, "signal name", empty=False)
        if dedupe_key is not None:
            text_arg(dedupe_key, "dedupe_key", empty=False)
        text = dumps(payload, f"payload of signal {name!r}")
        own = current_run.get() == run_id
        args = (run_id, name, text, dedupe_key)
        if conn is not None:
            return await self._signal(conn, args, own)
        async with self._acquire() as c:
            return await self._signal(c, args, own)

    async def _signal(
        self, conn: Connection, args: tuple[str, str, str, str | None], own: bool
    ) -> bool:
        run_id, name = args[0], args[1]
        with translated():
            if own:
                # A handler signalling its own run: the run is in this handler, not waiting,
                # and its lock is held by the handler's own transaction.
                await conn.execute(self.queries["record_signal"], *args)
                return True
            run = await conn.fetchrow(self.queries["run_queue"], run_id)
            if run is None:
                raise RunNotFound(f"no run with id {run_id!r}")
            if run["finished"] and args[3] is None:
                return False  # with a dedupe key, signal_v2 looks for the first answer
            self._check_signal_name(run["queue"], name)
            accepted: bool | None = await conn.fetchval(self.queries["signal"], *args)
        if accepted is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        log.debug(
            "signal %s sent to run %s", name, run_id, extra={"run_id": run_id, "signal": name}
        )
        return accepted

    def _check_signal_name(self, queue: str, name: str) -> None:
        """Refuse a signal no wait of the run's workflow can consume, when this engine knows
        that workflow and every wait of it has a fixed name (a wait whose name is computed
        could wait for any: then every name is accepted)."""
        wf = self._by_queue(queue)
        if wf is None:
            return
        names: set[str] = set()
        for node in wf.nodes:
            if isinstance(node, WaitForSignal):
                if not isinstance(node.signal, str):
                    return
                names.add(node.signal)
        if name not in names:
            known = ", ".join(repr(n) for n in sorted(names)) or "none"
            raise ArgumentError(
                f"no wait of workflow {wf.name!r} waits for signal {name!r} (it waits for: {known})"
            )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
