"""Where a node runs: the job handlers that advance a run and walk its compensations.

Each handler is called by the worker inside the job's transaction, with the job row locked;
it locks the run next (jobs before runs, everywhere), runs the node under a savepoint so a
failing handler's writes roll back while its attempt is recorded, and in one statement
journals the outcome, moves the cursor and hands the same job row on to the next node. The
worker then commits and, when the next node is due, continues with it on the same slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import anyio
import asyncpg

from durable.context import Context
from durable.db import Connection, dumps, loads
from durable.errors import NonRetryable, SerializationError
from durable.model import RunStatus
from durable.queue import Job, JobQueue
from durable.sql import Queries
from durable.worker import Outcome
from durable.workflow import Step, Workflow

log = logging.getLogger("durable.runner")

_FINISHED = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}


class WorkerLost(Exception):
    """The worker running a non-transactional attempt vanished and its lease lapsed."""


class DefinitionChanged(Exception):
    """The run's cursor points past the nodes its workflow now declares."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _payload(cursor: int, attempt: int) -> str:
    return f'{{"c": {cursor}, "a": {attempt}}}'


class Runner:
    """The `advance` and `compensate` job handlers of one engine."""

    def __init__(
        self,
        queries: Queries,
        workflows: Mapping[str, Workflow],
        *,
        lease_seconds: float = 30.0,
    ) -> None:
        self.q = queries
        self.jobs = JobQueue(queries)
        self.workflows = workflows
        self.runs_channel = f"{queries.schema}_runs"
        self.lease_seconds = lease_seconds
        self.pool: asyncpg.Pool | None = None

    # -- advance ---------------------------------------------------------------------------

    async def advance(self, conn: Connection, job: Job) -> Outcome:
        """Run the node the job points at, if the run is still there."""
        run = await conn.fetchrow(self.q["lock_run"], job.run_id)
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
        results: dict[str, Any] = loads(run["results"]) or {}
        if cursor >= len(wf.nodes):
            exc = DefinitionChanged(
                f"workflow {wf.name!r} has {len(wf.nodes)} nodes but run {job.run_id} is at "
                f"node #{cursor + 1}: the definition changed while the run was in flight"
            )
            return await self._fail_terminal(conn, job, run, f"#{cursor}", attempt, exc)
        step = wf.nodes[cursor]
        assert isinstance(step, Step)
        ctx = Context(
            input=loads(run["input"]),
            results=MappingProxyType(results),
            run_id=job.run_id or "",
            workflow=wf.name,
            node=step.name,
            attempt=attempt,
            conn=conn if step.transactional else None,
        )
        if job.lease_token is not None:
            lost = WorkerLost(
                f"the worker running attempt {attempt} of step {step.name!r} "
                "stopped heartbeating and its lease lapsed"
            )
            return await self._failed(conn, job, run, step, attempt, lost, run["now"])
        if not step.transactional:
            return await self._lease(conn, job, step, ctx, run)
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            value = await self._call(step, ctx)
            text = dumps(value, f"result of step {step.name!r}")
        except Exception as exc:
            await savepoint.rollback()
            return await self._failed(conn, job, run, step, attempt, exc, run["now"])
        return await self._completed(
            conn, job, wf, cursor, step, attempt, value, text, run["now"], results
        )

    async def _call(self, step: Step, ctx: Context) -> Any:
        if step.timeout is None:
            return await step.fn(ctx)
        try:
            return await asyncio.wait_for(step.fn(ctx), step.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"attempt {ctx.attempt} of step {step.name!r} timed out after {step.timeout:g} s"
            ) from None

    async def _completed(
        self,
        conn: Connection,
        job: Job,
        wf: Workflow,
        cursor: int,
        step: Step,
        attempt: int,
        value: Any,
        text: str,
        started: datetime,
        results: dict[str, Any],
    ) -> Outcome:
        nxt = cursor + 1
        fields = {"run_id": job.run_id, "workflow": wf.name, "node": step.name, "attempt": attempt}
        if nxt < len(wf.nodes):
            await conn.execute(
                self.q["complete_node"],
                job.run_id,
                step.name,
                text,
                attempt,
                started,
                nxt,
                wf.nodes[nxt].name,
                _payload(nxt, 1),
                job.id,
            )
            log.debug("node %s completed", step.name, extra=fields)
            return Outcome(settled=True, follow=job.id)
        final = dumps({**results, step.name: value}, f"result of run {job.run_id}")
        await conn.execute(
            self.q["complete_run"],
            job.run_id,
            step.name,
            text,
            attempt,
            started,
            nxt,
            final,
            job.id,
            self.runs_channel,
        )
        log.info("run %s completed", job.run_id, extra=fields)
        return Outcome(settled=True)

    async def _failed(
        self,
        conn: Connection,
        job: Job,
        run: asyncpg.Record,
        step: Step,
        attempt: int,
        exc: BaseException,
        started: datetime,
    ) -> Outcome:
        error = _describe(exc)
        fields = {
            "run_id": job.run_id,
            "workflow": run["workflow"],
            "node": step.name,
            "attempt": attempt,
            "error": error,
        }
        final = isinstance(exc, NonRetryable | SerializationError)
        if not final and attempt < step.max_attempts:
            delay = max(0.0, float(step.backoff(attempt)))
            await conn.execute(
                self.q["retry_node"],
                job.run_id,
                step.name,
                attempt,
                error,
                started,
                delay,
                _payload(int(job.payload["c"]), attempt + 1),
                job.id,
            )
            log.warning(
                "step %s attempt %d failed, retrying in %.2f s: %s",
                step.name,
                attempt,
                delay,
                error,
                extra=fields,
            )
            return Outcome(settled=True)
        log.error(
            "step %s failed for good after %d attempts: %s", step.name, attempt, error, extra=fields
        )
        return await self._fail_terminal(conn, job, run, step.name, attempt, exc, started)

    async def _fail_terminal(
        self,
        conn: Connection,
        job: Job,
        run: asyncpg.Record,
        key: str,
        attempt: int,
        exc: BaseException,
        started: datetime | None = None,
    ) -> Outcome:
        await conn.execute(
            self.q["fail_node"],
            job.run_id,
            key,
            attempt,
            _describe(exc),
            started or run["now"],
            key,
            dumps({"final": "failed", "a": 1}, "job payload"),
            job.id,
        )
        return Outcome(settled=True, follow=job.id)

    # -- non-transactional steps -----------------------------------------------------------

    async def _lease(
        self, conn: Connection, job: Job, step: Step, ctx: Context, run: asyncpg.Record
    ) -> Outcome:
        token = uuid.uuid4()
        await conn.execute(
            self.q["lease_node"],
            job.run_id,
            token,
            self.lease_seconds,
            _payload(int(job.payload["c"]), ctx.attempt),
            job.id,
        )

        async def detached() -> None:
            await self._run_leased(job, token, step, ctx, run["now"])

        return Outcome(settled=True, after_commit=detached)

    async def _run_leased(
        self, job: Job, token: uuid.UUID, step: Step, ctx: Context, started: datetime
    ) -> None:
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
                        if not await self.jobs.extend_lease(c, job.id, token, self.lease_seconds):
                            lost = True
                            scope.cancel()
                            return

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat, tg.cancel_scope)
            try:
                value = await self._call(step, ctx)
                outcome = (True, value)
            except Exception as exc:
                outcome = (False, exc)
            tg.cancel_scope.cancel()
        if lost or outcome is None:
            log.warning(
                "lease of step %s was lost; another worker retries it",
                step.name,
                extra={"run_id": job.run_id, "node": step.name},
            )
            return
        async with pool.acquire() as conn, conn.transaction():
            held = await self.jobs.claim_leased(conn, job.id, token)
            if held is None:
                return
            run = await conn.fetchrow(self.q["lock_run"], job.run_id)
            cursor = int(job.payload["c"])
            if run is None or run["status"] != "running" or run["cursor"] != cursor:
                await self.jobs.delete(conn, job.id)
                return
            wf = self.workflows[run["workflow"]]
            ok, value = outcome
            if ok:
                try:
                    text = dumps(value, f"result of step {step.name!r}")
                except SerializationError as exc:
                    ok, value = False, exc
            if not ok:
                await self._failed(conn, held, run, step, ctx.attempt, value, started)
                return
            await self._completed(
                conn,
                held,
                wf,
                cursor,
                step,
                ctx.attempt,
                value,
                text,
                started,
                loads(run["results"]) or {},
            )

    # -- compensate ------------------------------------------------------------------------

    async def compensate(self, conn: Connection, job: Job) -> Outcome:
        """Run the next compensator of a failing run, or finish it when none is left."""
        run = await conn.fetchrow(self.q["lock_run"], job.run_id)
        if run is None or run["status"] != "compensating":
            return Outcome()
        wf = self.workflows[run["workflow"]]
        final = str(job.payload.get("final", "failed"))
        attempt = int(job.payload.get("a", 1))
        rows = await conn.fetch(self.q["compensation_state"], job.run_id)
        compensated = {r["key"].rsplit("@", 1)[0] for r in rows if r["key"].endswith("@compensate")}
        target: tuple[asyncpg.Record, Step] | None = None
        for row in rows:
            if row["status"] != "completed" or "@" in row["key"] or row["key"] in compensated:
                continue
            node = wf.node(row["node"])
            if isinstance(node, Step) and node.compensate is not None:
                target = (row, node)
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
        row, step = target
        assert step.compensate is not None
        key = f"{row['key']}@compensate"
        ctx = Context(
            input=loads(run["input"]),
            results=MappingProxyType(loads(run["results"]) or {}),
            run_id=job.run_id or "",
            workflow=wf.name,
            node=key,
            attempt=attempt,
            conn=conn,
        )
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            value = await step.compensate(ctx)
            text: str | None = dumps(value, f"result of compensator {key!r}")
            status, error = "completed", None
        except Exception as exc:
            await savepoint.rollback()
            error = _describe(exc)
            fields = {
                "run_id": job.run_id,
                "workflow": wf.name,
                "node": key,
                "attempt": attempt,
                "error": error,
            }
            if attempt < step.max_attempts and not isinstance(exc, NonRetryable):
                delay = max(0.0, float(step.backoff(attempt)))
                await conn.execute(
                    self.q["retry_node"],
                    job.run_id,
                    key,
                    attempt,
                    error,
                    run["now"],
                    delay,
                    dumps({"final": final, "a": attempt + 1}, "job payload"),
                    job.id,
                )
                log.warning(
                    "compensator %s attempt %d failed, retrying: %s",
                    key,
                    attempt,
                    error,
                    extra=fields,
                )
                return Outcome(settled=True)
            log.error("compensator %s failed for good: %s", key, error, extra=fields)
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
            run["now"],
            dumps({"final": final, "a": 1}, "job payload"),
            job.id,
        )
        return Outcome(settled=True, follow=job.id)
