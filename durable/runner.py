"""Where a node runs: the job handlers that advance a run, run parallel branches and walk
compensations.

Each handler is called by the worker inside the job's transaction, with the job row locked;
it locks the run next (jobs before runs, everywhere), runs the node's code under a savepoint
so a failing handler's writes roll back while its attempt is recorded, and in one statement
journals the outcome, moves the cursor and hands the same job row on to the next node. The
worker then commits and, when the next node is due, continues with it on the same slot.
Parked runs (sleeps, signal waits, children) keep at most a delayed job and no worker slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, cast

import anyio
import asyncpg
from ulid import ULID

from durable.context import Context, LoopContext
from durable.db import Connection, dumps, is_connection_error, loads
from durable.errors import NonRetryable, SerializationError
from durable.queue import Job, JobQueue
from durable.sql import Queries
from durable.stepconn import StepConnection, swallowed_error, undo
from durable.tracing import node_span, record_failure
from durable.worker import Outcome
from durable.workflow import (
    ChildWorkflow,
    Handler,
    Loop,
    Node,
    Parallel,
    Route,
    Sleep,
    SleepUntil,
    Step,
    WaitForSignal,
    Workflow,
    is_seconds,
    resolve,
)

log = logging.getLogger("durable.runner")

_FINISHED = ("completed", "failed", "cancelled")


class WorkerLost(Exception):
    """The worker running a non-transactional attempt vanished and its lease lapsed."""


class DefinitionChanged(Exception):
    """The run's journal or cursor no longer matches its workflow's definition."""


class ChildFailed(Exception):
    """A child run ended failed or cancelled."""


class SwallowedDatabaseError(Exception):
    """A handler caught a database error on `ctx.conn` and returned as if nothing happened."""


class SignalTimeout(Exception):
    """A signal wait without a default timed out."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _declared_before(wf: Workflow, name: str, cursor: int) -> bool:
    position = wf.position(name)
    return position is not None and position < cursor


def _payload(cursor: int, attempt: int, **extra: Any) -> str:
    if not extra:  # the hot path: two integers need no encoder
        return f'{{"c": {int(cursor)}, "a": {int(attempt)}}}'
    return dumps({"c": cursor, "a": attempt, **extra}, "job payload")


@dataclass(slots=True)
class _Visit:
    """One job's look at its run: what every node kind needs."""

    conn: Connection
    job: Job
    run: asyncpg.Record
    wf: Workflow
    cursor: int
    attempt: int
    results: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.job.run_id)

    @property
    def now(self) -> datetime | None:
        """The database clock when the run was locked (None when a continuing worker
        re-locked it without reading; SQL then uses its transaction's start)."""
        started: datetime | None = self.run["now"]
        return started

    async def clock(self, queries: Queries) -> datetime:
        """The database clock (for wake times, which must never come from this host)."""
        if self.now is not None:
            return self.now
        now: datetime = await self.conn.fetchval(queries["db_now"])
        return now

    def context(
        self, node: str, *, transactional: bool = True, results: Mapping[str, Any] | None = None
    ) -> Context:
        return Context(
            input=loads(self.run["input"]),
            # Read-only view; the runner never mutates a results dict it has handed out.
            results=MappingProxyType(self.results if results is None else dict(results)),
            run_id=self.run_id,
            workflow=self.wf.name,
            node=node,
            attempt=self.attempt,
            # Duck-typed: a StepConnection proxies every Connection method.
            conn=cast(Connection, StepConnection(self.conn)) if transactional else None,
        )

    def fields(self, node: str, **extra: Any) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.wf.name,
            "node": node,
            "attempt": self.attempt,
            **extra,
        }


class Runner:
    """The `advance`, `branch` and `compensate` job handlers of one engine."""

    def __init__(
        self,
        queries: Queries,
        workflows: Mapping[str, Workflow],
        *,
        lease_seconds: float = 30.0,
        transaction_timeout: float | None = 60.0,
    ) -> None:
        self.q = queries
        self.transaction_timeout = transaction_timeout
        self.jobs = JobQueue(queries)
        self.workflows = workflows
        self.runs_channel = f"{queries.schema}_runs"
        self.jobs_channel = queries.notify_channel
        self.lease_seconds = lease_seconds
        self.pool: asyncpg.Pool | None = None
        # What this worker knows of the runs it is continuing, by the job id it claims next:
        # the cursor, the results and, after a plain node completion, the job and run as
        # they were committed (then the next claim needs no read at all).
        self._follow_cache: dict[int, tuple[int, dict[str, Any], Job | None]] = {}
        self._kinds: dict[str, Callable[[_Visit, Any], Awaitable[Outcome]]] = {
            "step": self._step,
            "sleep": self._sleep,
            "sleep_until": self._sleep,
            "wait_for_signal": self._wait,
            "parallel": self._parallel,
            "route": self._route,
            "loop": self._loop,
            "child_workflow": self._child,
        }

    # -- claiming --------------------------------------------------------------------------

    async def claim(self, conn: Connection, queues: Sequence[str]) -> Job | None:
        """Worker claim hook: the most urgent due job with its run locked and read."""
        row = await conn.fetchrow(self.q["claim_run_job"], list(queues))
        return None if row is None else Job.from_record(row, prefetched=(row, None))

    async def claim_follow(self, conn: Connection, job_id: int) -> Job | None:
        """Worker follow hook: commit, then claim the job this slot just handed on, reusing
        what it already knows of the run instead of re-reading it.

        After a plain node completion the commit, the next BEGIN and the re-lock of job and
        run travel in one simple-protocol message; the re-lock raises DU001 if another
        transaction took the job or moved the run in between.
        """
        cached = self._follow_cache.pop(job_id, None)
        if cached is not None and cached[2] is not None:
            cursor, _, job = cached
            try:
                await conn.execute(
                    "COMMIT; BEGIN; SELECT "
                    f"{self.q.schema_sql}.relock_run_job_v1({int(job_id)}, {int(cursor)})"
                )
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != "DU001":
                    raise
                return None
            return job
        await conn.execute("COMMIT; BEGIN")
        row = await conn.fetchrow(self.q["claim_run_job_by_id"], job_id, cached is None)
        if row is None:
            return None
        results = cached[1] if cached is not None and cached[0] == row["cursor"] else None
        return Job.from_record(row, prefetched=(row, results))

    def _follow(
        self, v: _Visit, cursor: int, results: dict[str, Any], *, moved: bool = False
    ) -> Outcome:
        """Hand the job on to this slot, remembering what the next node needs.

        `moved`: the node completed and the job now points at node `cursor` of a running
        run, exactly as committed, so the next claim can be a blind re-lock.
        """
        if len(self._follow_cache) > 10_000:
            self._follow_cache.clear()
        job: Job | None = None
        if moved:
            run = {
                "workflow": v.wf.name,
                "status": "running",
                "input": v.run["input"],
                "cursor": cursor,
                "current_node": v.wf.nodes[cursor].name,
                "error": None,
                "parent_id": v.run["parent_id"],
                "wake_at": None,
                "waiting_for": None,
                "now": None,
                "results": None,
            }
            job = replace(
                v.job,
                task="advance",
                payload={"c": cursor, "a": 1},
                lease_token=None,
                prefetched=(run, results),
            )
        self._follow_cache[v.job.id] = (cursor, results, job)
        return Outcome(settled=True, follow=v.job.id)

    async def _locked_run(
        self, conn: Connection, job: Job
    ) -> tuple[asyncpg.Record | None, dict[str, Any]]:
        """The job's run, locked, and its results (from the claim when it read them)."""
        if job.prefetched is not None:
            run, results = job.prefetched
            if run["workflow"] is None:
                return None, {}
        else:
            run, results = await conn.fetchrow(self.q["lock_run"], job.run_id), None
            if run is None:
                return None, {}
        if results is None:
            text = run["results"]
            if text is None and job.prefetched is not None and job.prefetched[1] is None:
                text = await conn.fetchval(self.q["run_results"], job.run_id)
            results = loads(text) or {}
        return run, results

    # -- advance ---------------------------------------------------------------------------

    async def advance(self, conn: Connection, job: Job) -> Outcome:
        """Run the node the job points at, if the run is still there and still at it."""
        run, results = await self._locked_run(conn, job)
        cursor, attempt = int(job.payload["c"]), int(job.payload["a"])
        if run is None or run["status"] in _FINISHED or run["status"] == "compensating":
            return Outcome()  # stale: the run finished or is rolling back
        if run["cursor"] != cursor:
            log.debug(
                "stale job %s for run %s",
                job.id,
                job.run_id,
                extra={"run_id": job.run_id, "job_id": job.id},
            )
            return Outcome()
        wf = self.workflows[run["workflow"]]
        visit = _Visit(conn, job, run, wf, cursor, attempt, results)
        if cursor >= len(wf.nodes):
            exc = DefinitionChanged(
                f"workflow {wf.name!r} has {len(wf.nodes)} nodes but run {job.run_id} is at "
                f"node #{cursor + 1}: the definition changed while the run was in flight"
            )
            return await self._fail_terminal(visit, f"#{cursor}", exc)
        node = wf.nodes[cursor]
        if run["current_node"] is not None and run["current_node"] != node.name:
            changed = DefinitionChanged(
                f"run {job.run_id} was at node {run['current_node']!r} (#{cursor + 1}) but "
                f"workflow {wf.name!r} now declares {node.name!r} there: the definition "
                "changed while the run was in flight"
            )
            return await self._fail_terminal(visit, run["current_node"], changed)
        if job.prefetched is None or job.prefetched[1] is None:
            # Read from the journal (not carried over by this worker): every node the run
            # completed must still be declared, before its position.
            passed = [k for k in results if not _declared_before(wf, k, cursor)]
            if passed:
                changed = DefinitionChanged(
                    f"run {job.run_id} completed node(s) {sorted(passed)} that workflow "
                    f"{wf.name!r} no longer declares before node #{cursor + 1}: the "
                    "definition changed while the run was in flight"
                )
                return await self._fail_terminal(visit, run["current_node"] or node.name, changed)
        with node_span(node.kind, node.name, run_id=job.run_id, workflow=wf.name, attempt=attempt):
            return await self._kinds[node.kind](visit, node)

    async def _attempt(
        self,
        ctx: Context,
        what: str,
        call: Callable[[], Awaitable[Any]],
        *,
        timeout: float | None = None,
    ) -> tuple[bool, Any, str | None]:
        """Run `call`: (True, value, json), or (False, error, None) with the writes it made
        through `ctx.conn` rolled back.

        An attempt inside a transaction is cut off after `transaction_timeout` (a stuck
        handler must not hold locks and pin the vacuum horizon); `timeout` is the node's own
        per-attempt bound.
        """
        limit = self.transaction_timeout if ctx.conn is not None else None
        own = timeout is not None and (limit is None or timeout <= limit)
        if own:
            limit = timeout
        try:
            if limit is None:
                value = await call()
            else:
                try:
                    value = await asyncio.wait_for(call(), limit)
                except TimeoutError:
                    if own:
                        raise TimeoutError(
                            f"attempt {ctx.attempt} of {what} timed out after {limit:g} s"
                        ) from None
                    raise TimeoutError(
                        f"attempt {ctx.attempt} of {what} ran longer than the transaction limit "
                        f"of {limit:g} s (Engine(transaction_timeout=...)); long external calls "
                        "belong in transactional=False steps"
                    ) from None
            swallowed = swallowed_error(ctx.conn)
            if swallowed is not None:
                raise SwallowedDatabaseError(
                    f"{what} returned normally after a statement on ctx.conn failed "
                    f"({type(swallowed).__name__}: {swallowed}); the transaction was aborted, "
                    "so the attempt's writes were rolled back"
                )
            return True, value, dumps(value, f"result of {what}")
        except Exception as exc:
            await undo(ctx.conn)
            return False, exc, None

    async def _complete(
        self, v: _Visit, node: Node, value: Any, text: str | None = None
    ) -> Outcome:
        """Journal `node` with `value`, move the cursor and pass the job to the next node."""
        if text is None:
            text = dumps(value, f"result of node {node.name!r}")
        nxt = v.cursor + 1
        if nxt < len(v.wf.nodes):
            await v.conn.execute(
                self.q["complete_node"],
                v.run_id,
                node.name,
                text,
                v.attempt,
                v.now,
                nxt,
                v.wf.nodes[nxt].name,
                _payload(nxt, 1),
                v.job.id,
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("node %s completed", node.name, extra=v.fields(node.name))
            # The next node must see the result as stored (JSON: string keys, lists), the
            # same as after a restart, not the handler's Python object.
            stored = value if value is None or type(value) in (bool, int, str) else loads(text)
            return self._follow(v, nxt, {**v.results, node.name: stored}, moved=True)
        final = dumps({**v.results, node.name: value}, f"result of run {v.run_id}")
        await v.conn.execute(
            self.q["complete_run"],
            v.run_id,
            node.name,
            text,
            v.attempt,
            v.now,
            nxt,
            final,
            v.job.id,
            self.runs_channel,
        )
        log.info("run %s completed", v.run_id, extra=v.fields(node.name))
        return Outcome(settled=True)

    async def _failure(
        self,
        v: _Visit,
        node: Node,
        key: str,
        exc: BaseException,
        max_attempts: int,
        backoff: Callable[[int], float],
        **extra: Any,
    ) -> Outcome:
        """Retry attempt `v.attempt` of `key` after its backoff, or fail the node for good."""
        error = _describe(exc)
        retry = not isinstance(exc, NonRetryable | SerializationError) and v.attempt < max_attempts
        record_failure(exc, final=not retry)
        if retry:
            delay = max(0.0, float(backoff(v.attempt)))
            await v.conn.execute(
                self.q["retry_node"],
                v.run_id,
                key,
                v.attempt,
                error,
                v.now,
                delay,
                _payload(v.cursor, v.attempt + 1, **extra),
                v.job.id,
            )
            log.warning(
                "%s attempt %d failed, retrying in %.2f s: %s",
                key,
                v.attempt,
                delay,
                error,
                extra=v.fields(key, error=error),
            )
            return Outcome(settled=True)
        log.error(
            "%s failed for good after %d attempts: %s",
            key,
            v.attempt,
            error,
            extra=v.fields(key, error=error),
        )
        return await self._fail_terminal(v, node.name, exc, key=key)

    async def _fail_terminal(
        self, v: _Visit, node: str, exc: BaseException, *, key: str | None = None
    ) -> Outcome:
        """Journal `node` as failed and turn the job into the run's compensation walk."""
        await v.conn.execute(
            self.q["fail_node"],
            v.run_id,
            key or node,
            v.attempt,
            _describe(exc),
            v.now,
            node,
            dumps({"final": "failed", "a": 1}, "job payload"),
            v.job.id,
        )
        return self._follow(v, v.cursor, v.results)

    async def _park(
        self, v: _Visit, wake_at: datetime | None, signal: str | None, *, keep_job: bool
    ) -> Outcome:
        await v.conn.execute(
            self.q["park_run"], v.run_id, wake_at, signal, v.job.id, _payload(v.cursor, 1), keep_job
        )
        return Outcome(settled=True)

    # -- step ------------------------------------------------------------------------------

    async def _step(self, v: _Visit, step: Step) -> Outcome:
        ctx = v.context(step.name, transactional=step.transactional)
        if v.job.lease_token is not None:
            lost = WorkerLost(
                f"the worker running attempt {v.attempt} of step {step.name!r} "
                "stopped heartbeating and its lease lapsed"
            )
            return await self._failure(v, step, step.name, lost, step.max_attempts, step.backoff)
        if not step.transactional:
            return await self._lease(v, step, ctx)
        ok, value, text = await self._attempt(
            ctx, f"step {step.name!r}", lambda: step.fn(ctx), timeout=step.timeout
        )
        if not ok:
            return await self._failure(v, step, step.name, value, step.max_attempts, step.backoff)
        return await self._complete(v, step, value, text)

    async def _call(self, step: Step, ctx: Context) -> Any:
        if step.timeout is None:
            return await step.fn(ctx)
        try:
            return await asyncio.wait_for(step.fn(ctx), step.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"attempt {ctx.attempt} of step {step.name!r} timed out after {step.timeout:g} s"
            ) from None

    async def _lease(self, v: _Visit, step: Step, ctx: Context) -> Outcome:
        token = uuid.uuid4()
        await v.conn.execute(
            self.q["lease_node"],
            v.run_id,
            token,
            self.lease_seconds,
            _payload(v.cursor, v.attempt),
            v.job.id,
        )

        async def detached() -> None:
            await self._run_leased(v, token, step, ctx)

        return Outcome(settled=True, after_commit=detached)

    async def _run_leased(self, v: _Visit, token: uuid.UUID, step: Step, ctx: Context) -> None:
        assert self.pool is not None
        pool = self.pool
        outcome: tuple[bool, Any] | None = None
        lost = False

        async def heartbeat(scope: anyio.CancelScope) -> None:
            nonlocal lost
            while True:
                await anyio.sleep(self.lease_seconds / 3)
                with contextlib.suppress(Exception):
                    async with pool.acquire() as c:
                        if not await self.jobs.extend_lease(c, v.job.id, token, self.lease_seconds):
                            lost = True
                            scope.cancel()
                            return

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat, tg.cancel_scope)
            try:
                outcome = (True, await self._call(step, ctx))
            except Exception as exc:
                outcome = (False, exc)
            tg.cancel_scope.cancel()
        if lost or outcome is None:
            log.warning(
                "lease of step %s was lost; another worker retries it",
                step.name,
                extra=v.fields(step.name),
            )
            return
        # Settle the finished attempt. A dropped connection must not throw the result away
        # (another worker would run the step again and count a lost attempt): try again
        # while the lease is ours; the lease token makes a second commit impossible.
        deadline = anyio.current_time() + self.lease_seconds
        while True:
            try:
                await self._settle_leased(pool, v, token, step, outcome)
                return
            except Exception as exc:
                if not is_connection_error(exc) or anyio.current_time() > deadline:
                    raise
                log.warning(
                    "settling step %s lost its connection, retrying: %s",
                    step.name,
                    exc,
                    extra=v.fields(step.name),
                )
                await anyio.sleep(0.2)

    async def _settle_leased(
        self,
        pool: asyncpg.Pool,
        v: _Visit,
        token: uuid.UUID,
        step: Step,
        outcome: tuple[bool, Any],
    ) -> None:
        async with pool.acquire() as conn, conn.transaction():
            held = await self.jobs.claim_leased(conn, v.job.id, token)
            if held is None:
                return
            run = await conn.fetchrow(self.q["lock_run"], v.run_id)
            if run is None or run["status"] != "running" or run["cursor"] != v.cursor:
                await self.jobs.delete(conn, v.job.id)
                return
            settle = _Visit(conn, held, run, v.wf, v.cursor, v.attempt, loads(run["results"]) or {})
            ok, value = outcome
            text: str | None = None
            if ok:
                try:
                    text = dumps(value, f"result of step {step.name!r}")
                except SerializationError as exc:
                    ok, value = False, exc
            if not ok:
                await self._failure(settle, step, step.name, value, step.max_attempts, step.backoff)
                return
            await self._complete(settle, step, value, text)

    # -- sleep -----------------------------------------------------------------------------

    async def _sleep(self, v: _Visit, node: Sleep | SleepUntil) -> Outcome:
        wake_at: datetime | None = v.run["wake_at"]
        now = await v.clock(self.q)
        if wake_at is not None:
            if wake_at > now:
                return await self._park(v, wake_at, None, keep_job=True)  # delivered early
            return await self._complete(v, node, None)
        ctx = v.context(node.name)
        try:
            if isinstance(node, Sleep):
                seconds = await resolve(node.seconds, ctx)
                if not is_seconds(seconds):
                    raise TypeError(f"sleep {node.name!r}: expected seconds >= 0, got {seconds!r}")
                wake_at = now + timedelta(seconds=float(seconds))
            else:
                wake_at = await resolve(node.when, ctx)
                if not isinstance(wake_at, datetime) or wake_at.tzinfo is None:
                    raise TypeError(
                        f"sleep_until {node.name!r}: expected an aware datetime, got {wake_at!r}"
                    )
        except Exception as exc:
            return await self._fail_terminal(v, node.name, exc)
        if wake_at <= now:
            return await self._complete(v, node, None)
        return await self._park(v, wake_at, None, keep_job=True)

    # -- wait_for_signal -------------------------------------------------------------------

    async def _wait(self, v: _Visit, node: WaitForSignal) -> Outcome:
        signal: str | None = v.run["waiting_for"]
        now = await v.clock(self.q)
        first_visit = signal is None
        if signal is None:
            try:
                signal = await resolve(node.signal, v.context(node.name))
                if not isinstance(signal, str) or not signal:
                    raise TypeError(
                        f"wait_for_signal {node.name!r}: the signal name must be a "
                        f"non-empty string, got {signal!r}"
                    )
            except Exception as exc:
                return await self._fail_terminal(v, node.name, exc)
        got = await v.conn.fetchrow(self.q["consume_signal"], v.run_id, signal, node.name)
        if got is not None:
            return await self._complete(v, node, loads(got["payload"]), got["payload"] or "null")
        if first_visit:
            wake_at = None if node.timeout is None else now + timedelta(seconds=node.timeout)
            return await self._park(v, wake_at, signal, keep_job=wake_at is not None)
        wake_at = v.run["wake_at"]
        if wake_at is not None and wake_at <= now:
            if node.has_default:
                return await self._complete(v, node, node.default)
            err = SignalTimeout(f"no signal {signal!r} arrived within {node.timeout:g} s")
            return await self._fail_terminal(v, node.name, err)
        return await self._park(v, wake_at, signal, keep_job=wake_at is not None)

    # -- route -----------------------------------------------------------------------------

    async def _route(self, v: _Visit, node: Route) -> Outcome:
        decision_key = f"{node.name}@route"
        ctx = v.context(node.name)
        decided = await v.conn.fetchrow(self.q["journal_value"], v.run_id, decision_key)
        if decided is None:
            try:
                branch = await resolve(node.select, ctx)
            except Exception as exc:
                return await self._failure(v, node, node.name, exc, node.max_attempts, node.backoff)
            if not isinstance(branch, str) or branch not in node.branches:
                known = ", ".join(repr(b) for b in node.branches)
                err = ValueError(
                    f"route {node.name!r} chose unknown branch {branch!r}; known branches: {known}"
                )
                return await self._fail_terminal(v, node.name, err)
            await v.conn.execute(
                self.q["journal_entry"],
                v.run_id,
                decision_key,
                node.name,
                "completed",
                dumps(branch, "route choice"),
                None,
                v.attempt,
                v.now,
            )
        else:
            branch = loads(decided["result"])
            if branch not in node.branches:
                changed = DefinitionChanged(
                    f"route {node.name!r} journaled branch {branch!r}, "
                    "which the workflow no longer declares"
                )
                return await self._fail_terminal(v, node.name, changed)
        handler = node.branches[branch]
        branch_ctx = v.context(node.name)  # its own savepoint, after the journaled choice
        ok, value, _ = await self._attempt(
            branch_ctx, f"route {node.name!r}", lambda: handler(branch_ctx)
        )
        if not ok:
            return await self._failure(v, node, node.name, value, node.max_attempts, node.backoff)
        return await self._complete(v, node, {"branch": branch, "result": value})

    # -- loop ------------------------------------------------------------------------------

    async def _loop(self, v: _Visit, node: Loop) -> Outcome:
        rows = await v.conn.fetch(self.q["sub_results"], v.run_id, node.name)
        done = [loads(r["result"]) for r in rows]
        i = len(done)
        if int(v.job.payload.get("i", 0)) != i:
            return Outcome()  # a duplicate of a job whose iteration already committed
        results = {**v.results, node.name: list(done)}
        ctx = v.context(node.name, results=results)
        key = f"{node.name}#{i}"

        async def iteration() -> tuple[bool, Any]:
            if not await resolve(node.condition, ctx, i):
                return False, None
            if i >= node.max_iterations:
                raise NonRetryable(
                    f"loop {node.name!r}: condition still holds after "
                    f"max_iterations={node.max_iterations}"
                )
            body_ctx = LoopContext(
                input=ctx.input,
                results=ctx.results,
                run_id=ctx.run_id,
                workflow=ctx.workflow,
                node=key,
                attempt=ctx.attempt,
                conn=ctx.conn,
                iteration=i,
            )
            return True, await node.body(body_ctx)

        ok, value, _ = await self._attempt(ctx, f"loop {node.name!r}", iteration)
        if not ok:
            return await self._failure(v, node, key, value, node.max_attempts, node.backoff, i=i)
        more, result = value
        if not more:
            return await self._complete(v, node, done)
        await v.conn.execute(
            self.q["journal_entry"],
            v.run_id,
            key,
            node.name,
            "completed",
            dumps(result, f"result of {key!r}"),
            None,
            v.attempt,
            v.now,
        )
        if v.run["status"] != "running":
            await v.conn.execute(self.q["mark_running"], v.run_id)
        await self.jobs.reschedule(v.conn, v.job.id, 0.0, {"c": v.cursor, "a": 1, "i": i + 1})
        return self._follow(v, v.cursor, v.results)

    # -- parallel --------------------------------------------------------------------------

    async def _parallel(self, v: _Visit, node: Parallel) -> Outcome:
        rows = await v.conn.fetch(self.q["sub_results"], v.run_id, node.name)
        done = {r["key"].split("#", 1)[1]: loads(r["result"]) for r in rows}
        if len(done) == len(node.branches):
            return await self._complete(v, node, {b: done[b] for b in node.branches})
        missing = [b for b in node.branches if b not in done]
        await v.conn.execute(self.q["fan_out"], v.wf.name, v.run_id, v.cursor, missing)
        await v.conn.execute(self.q["mark_running"], v.run_id)
        return Outcome()

    async def branch(self, conn: Connection, job: Job) -> Outcome:
        """Run one branch of a parallel node in its own transaction."""
        with node_span(
            "branch", str(job.payload.get("b")), run_id=job.run_id, attempt=job.payload.get("a")
        ):
            return await self._branch(conn, job)

    async def _branch_gone(
        self, conn: Connection, job: Job, wf: Workflow, cursor: int, branch: str
    ) -> Outcome:
        """The workflow no longer has this branch at the run's cursor: fail the run clearly
        (if it is still there) instead of leaving it running with no job."""
        run, results = await self._locked_run(conn, replace(job, prefetched=None))
        if run is None or run["status"] != "running" or run["cursor"] != cursor:
            return Outcome()
        v = _Visit(conn, job, run, wf, cursor, int(job.payload["a"]), results)
        changed = DefinitionChanged(
            f"run {job.run_id} has branch {branch!r} in flight at node #{cursor + 1} "
            f"({run['current_node']!r}), which workflow {wf.name!r} no longer declares: the "
            "definition changed while the run was in flight"
        )
        return await self._fail_terminal(v, run["current_node"] or f"#{cursor}", changed)

    async def _branch(self, conn: Connection, job: Job) -> Outcome:
        peek = (
            job.prefetched[0]
            if job.prefetched is not None
            else await conn.fetchrow(self.q["peek_run"], job.run_id)
        )
        cursor, attempt, branch = int(job.payload["c"]), int(job.payload["a"]), job.payload["b"]
        if peek is None or peek["status"] != "running" or peek["cursor"] != cursor:
            return Outcome()
        wf = self.workflows[peek["workflow"]]
        node = wf.nodes[cursor] if cursor < len(wf.nodes) else None
        if not isinstance(node, Parallel) or branch not in node.branches:
            return await self._branch_gone(conn, job, wf, cursor, branch)
        key = f"{node.name}#{branch}"
        if await conn.fetchrow(self.q["journal_value"], job.run_id, key) is not None:
            return Outcome()  # committed already (a duplicate job)
        peek_results = peek["results"]
        if peek_results is None:
            peek_results = await conn.fetchval(self.q["run_results"], job.run_id)
        ctx = _Visit(conn, job, peek, wf, cursor, attempt, loads(peek_results) or {}).context(key)
        handler: Handler = node.branches[branch]
        ok, value, text = await self._attempt(ctx, f"branch {key!r}", lambda: handler(ctx))
        error: Exception | None = None if ok else value
        run = await conn.fetchrow(self.q["lock_run"], job.run_id)
        if run is None or run["status"] != "running" or run["cursor"] != cursor:
            await undo(ctx.conn)  # the node failed meanwhile: this branch is moot
            return Outcome()
        v = _Visit(conn, job, run, wf, cursor, attempt, loads(run["results"]) or {})
        if error is not None:
            return await self._failure(
                v, node, key, error, node.max_attempts, node.backoff, b=branch
            )
        await conn.execute(
            self.q["journal_entry"],
            job.run_id,
            key,
            node.name,
            "completed",
            text,
            None,
            attempt,
            v.now,
        )
        rows = await conn.fetch(self.q["sub_results"], job.run_id, node.name)
        if len(rows) < len(node.branches):
            return Outcome()
        done = {r["key"].split("#", 1)[1]: loads(r["result"]) for r in rows}
        return await self._complete(v, node, {b: done[b] for b in node.branches})

    # -- child workflow --------------------------------------------------------------------

    async def _child(self, v: _Visit, node: ChildWorkflow) -> Outcome:
        marker_key = f"{node.name}@child"
        marker = await v.conn.fetchrow(self.q["journal_value"], v.run_id, marker_key)
        if marker is None:
            try:
                spec = await resolve(node.start, v.context(node.name))
                if not (
                    isinstance(spec, tuple | list)
                    and len(spec) == 2
                    and isinstance(spec[1], Mapping)
                ):
                    raise TypeError(
                        f"child_workflow {node.name!r}: start must return "
                        f"(workflow_name, input_dict), got {spec!r}"
                    )
                name, child_input = spec
                child_wf = self.workflows.get(name) if isinstance(name, str) else None
                if child_wf is None:
                    raise LookupError(
                        f"child_workflow {node.name!r}: workflow {name!r} is not registered"
                    )
                text = dumps(dict(child_input), f"input of child workflow {name!r}")
            except Exception as exc:
                return await self._fail_terminal(v, node.name, exc)
            child_id = str(ULID())
            await v.conn.fetchval(
                self.q["insert_run"],
                child_id,
                child_wf.name,
                text,
                child_wf.nodes[0].name,
                None,
                v.run_id,
                node.name,
            )
            await v.conn.execute(
                self.q["journal_entry"],
                v.run_id,
                marker_key,
                node.name,
                "completed",
                dumps({"run_id": child_id}, "child marker"),
                None,
                v.attempt,
                v.now,
            )
            log.info(
                "run %s started child %s (%s)",
                v.run_id,
                child_id,
                child_wf.name,
                extra=v.fields(node.name, child_id=child_id),
            )
            return await self._park(v, None, None, keep_job=False)
        child_id = loads(marker["result"])["run_id"]
        child = await v.conn.fetchrow(self.q["child_state"], child_id)
        if child is None:
            return await self._fail_terminal(
                v, node.name, ChildFailed(f"child run {child_id} was purged")
            )
        if child["status"] == "completed":
            return await self._complete(v, node, loads(child["result"]), child["result"])
        if child["status"] in ("failed", "cancelled"):
            err = ChildFailed(f"child run {child_id} ended {child['status']}: {child['error']}")
            return await self._fail_terminal(v, node.name, err)
        return Outcome()  # woken early: the child's end will wake the run again

    # -- compensate ------------------------------------------------------------------------

    def _compensator(
        self, wf: Workflow, row: asyncpg.Record
    ) -> tuple[Handler, int, Callable[[int], float]] | None:
        node = wf.node(row["node"])
        if isinstance(node, Step) and "#" not in row["key"] and node.compensate is not None:
            return node.compensate, node.max_attempts, node.backoff
        if isinstance(node, Parallel) and "#" in row["key"]:
            fn = node.compensate.get(row["key"].split("#", 1)[1])
            if fn is not None:
                return fn, node.max_attempts, node.backoff
        return None

    async def compensate(self, conn: Connection, job: Job) -> Outcome:
        """Run the next compensator of a failing run, or finish it when none is left."""
        with node_span(
            "compensate", "compensation", run_id=job.run_id, attempt=job.payload.get("a")
        ):
            return await self._compensate(conn, job)

    async def _compensate(self, conn: Connection, job: Job) -> Outcome:
        run, results = await self._locked_run(conn, job)
        if run is None or run["status"] != "compensating":
            return Outcome()
        wf = self.workflows[run["workflow"]]
        final = str(job.payload.get("final", "failed"))
        attempt = int(job.payload.get("a", 1))
        rows = await conn.fetch(self.q["compensation_state"], job.run_id)
        compensated = {r["key"].rsplit("@", 1)[0] for r in rows if r["key"].endswith("@compensate")}
        target = None
        for row in rows:
            if row["status"] != "completed" or "@" in row["key"] or row["key"] in compensated:
                continue
            if wf.position(row["node"]) is None:
                log.warning(
                    "run %s: node %r is no longer declared by workflow %r; it cannot be "
                    "compensated",
                    job.run_id,
                    row["node"],
                    wf.name,
                    extra={"run_id": job.run_id, "workflow": wf.name, "node": row["node"]},
                )
                continue
            found = self._compensator(wf, row)
            if found is not None:
                target = (row, *found)
                break
        if target is None:
            await conn.execute(
                self.q["finish_run"], job.run_id, final, None, job.id, self.runs_channel
            )
            log.info(
                "run %s %s",
                job.run_id,
                final,
                extra={"run_id": job.run_id, "workflow": wf.name, "status": final},
            )
            return Outcome(settled=True)
        row, fn, max_attempts, backoff = target
        key = f"{row['key']}@compensate"
        v = _Visit(conn, job, run, wf, int(run["cursor"]), attempt, results)
        ctx = v.context(key)
        ok, value, text = await self._attempt(ctx, f"compensator {key!r}", lambda: fn(ctx))
        status, error = "completed", None
        if not ok:
            error = _describe(value)
            if attempt < max_attempts and not isinstance(value, NonRetryable):
                delay = max(0.0, float(backoff(attempt)))
                await conn.execute(
                    self.q["retry_node"],
                    job.run_id,
                    key,
                    attempt,
                    error,
                    v.now,
                    delay,
                    dumps({"final": final, "a": attempt + 1}, "job payload"),
                    job.id,
                )
                log.warning(
                    "compensator %s attempt %d failed, retrying: %s",
                    key,
                    attempt,
                    error,
                    extra=v.fields(key, error=error),
                )
                return Outcome(settled=True)
            log.error(
                "compensator %s failed for good: %s", key, error, extra=v.fields(key, error=error)
            )
            status, text = "failed", None
        await conn.execute(
            self.q["journal_compensation"],
            job.run_id,
            key,
            row["node"],
            status,
            text,
            error,
            attempt,
            v.now,
            dumps({"final": final, "a": 1}, "job payload"),
            job.id,
        )
        return self._follow(v, v.cursor, v.results)
