"""The built-in job queue: enqueue, claim, settle and retry jobs on a caller's connection.

Every function takes the connection whose transaction the operation must join: enqueueing
commits with the caller's writes, and a claimed job's row lock lasts exactly as long as the
transaction that does its work. A worker that dies mid-job loses its transaction, so the lock
goes with it and the job is claimable again at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from durable.db import Connection, dumps, loads
from durable.sql import Queries


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed job. `attempts` counts its earlier failed or leased attempts."""

    id: int
    queue: str
    task: str
    run_id: str | None
    payload: dict[str, Any]
    priority: int
    attempts: int
    lease_token: uuid.UUID | None
    #: What a claim hook read alongside the job (the engine's locked run row), if anything.
    prefetched: Any = None

    @classmethod
    def from_record(cls, row: asyncpg.Record, prefetched: Any = None) -> Job:
        """Build a `Job` from a row of the claim queries."""
        return cls(
            prefetched=prefetched,
            id=row["id"],
            queue=row["queue"],
            task=row["task"],
            run_id=row["run_id"],
            payload=loads(row["payload"]),
            priority=row["priority"],
            attempts=row["attempts"],
            lease_token=row["lease_token"],
        )


class JobQueue:
    """Queue operations for one schema."""

    def __init__(self, queries: Queries) -> None:
        self.q = queries

    async def enqueue(
        self,
        conn: Connection,
        queue: str,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        delay: float = 0.0,
        priority: int = 0,
    ) -> int:
        """Insert a job in `conn`'s transaction; it is due `delay` seconds after DB `now()`."""
        text = dumps(dict(payload or {}), f"payload of job {task!r}")
        job_id: int = await conn.fetchval(
            self.q["enqueue_job"], queue, task, run_id, text, priority, float(delay)
        )
        return job_id

    async def claim(self, conn: Connection, queues: Sequence[str]) -> Job | None:
        """Lock the most urgent due job of `queues` for `conn`'s open transaction."""
        row = await conn.fetchrow(self.q["claim_job"], list(queues))
        return None if row is None else Job.from_record(row)

    async def claim_by_id(self, conn: Connection, job_id: int) -> Job | None:
        """Lock job `job_id` if it is due and no other transaction holds it."""
        row = await conn.fetchrow(self.q["claim_job_by_id"], job_id)
        return None if row is None else Job.from_record(row)

    async def due_state(self, conn: Connection, queues: Sequence[str]) -> tuple[float | None, bool]:
        """(seconds until the next delayed job is due or None, whether due jobs exist that
        are held by other transactions)."""
        row = await conn.fetchrow(self.q["due_state"], list(queues))
        assert row is not None
        return row["next_due"], bool(row["held"])

    async def delete(self, conn: Connection, job_id: int) -> None:
        """Delete a job; call it in the transaction that commits the job's work."""
        await conn.execute(self.q["delete_job"], job_id)

    async def reschedule(
        self, conn: Connection, job_id: int, delay: float, payload: Mapping[str, Any]
    ) -> None:
        """Make a held job due again after `delay` seconds, with a new payload."""
        await conn.execute(
            self.q["reschedule_job"], job_id, float(delay), dumps(dict(payload), "job payload")
        )

    async def retry(self, conn: Connection, job_id: int, delay: float) -> int | None:
        """Count a failed attempt and delay the job; None if another worker holds it now."""
        attempts: int | None = await conn.fetchval(self.q["retry_job"], job_id, float(delay))
        return attempts

    async def lease(self, conn: Connection, job_id: int, seconds: float) -> uuid.UUID:
        """Lease a held job for `seconds`; commit, then work outside any transaction."""
        token = uuid.uuid4()
        await conn.execute(self.q["lease_job"], job_id, token, float(seconds))
        return token

    async def extend_lease(
        self, conn: Connection, job_id: int, token: uuid.UUID, seconds: float
    ) -> bool:
        """Push the lease of a job `seconds` past now; False if the lease was lost."""
        return (
            await conn.fetchval(self.q["extend_lease"], job_id, token, float(seconds)) is not None
        )

    async def claim_leased(self, conn: Connection, job_id: int, token: uuid.UUID) -> Job | None:
        """Lock a leased job to settle it; None if the lease lapsed and was taken over."""
        row = await conn.fetchrow(self.q["claim_leased_job"], job_id, token)
        return None if row is None else Job.from_record(row)

    async def count(self, conn: Connection) -> int:
        """Number of live jobs."""
        n: int = await conn.fetchval(self.q["count_jobs"])
        return n


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker does once a handler returns, inside the job's transaction.

    `settled`: the handler already deleted or rescheduled the job row itself (otherwise the
    worker deletes it). `follow`: a job id this slot claims right after the commit, so a run
    continues on the same worker without waiting for a claim. `after_commit`: work to run
    after the commit while the slot stays taken (non-transactional handlers). `solo`: the
    job changed more than its own run (a cancel reaching its children), so the jobs of a
    batch after it, whose runs were read at the claim, do not run in this transaction.
    `busy`: seconds the job spent in user code, what a batch's window counts (None: the
    whole job, handler and bookkeeping).
    """

    settled: bool = False
    follow: int | None = None
    after_commit: Callable[[], Awaitable[None]] | None = None
    solo: bool = False
    busy: float | None = None


Handler = Callable[[Connection, Job], Awaitable[Outcome | None]]
#: Claims the most urgent due job of the given queues in the connection's transaction.
ClaimHook = Callable[[Connection, Sequence[str]], Awaitable[Job | None]]
#: Commits the open transaction, opens the next one and claims a known job in it (a run
#: continuing on the same slot); None if the job is not due and free.
FollowHook = Callable[[Connection, int], Awaitable[Job | None]]
#: The known job a run continuing on the same slot goes on with in the open transaction,
#: or None: it is then committed and claimed (`FollowHook`).
ChainHook = Callable[[int], Job | None]
#: Records, in a new transaction, that a job's work failed outside its handler's own
#: bookkeeping (the job's transaction was rolled back).
ErrorHook = Callable[[Connection, Job, Exception], Awaitable[None]]
#: Claims up to `n` due jobs of the given queues (of different runs) in the connection's
#: transaction, most urgent first.
BatchClaimHook = Callable[[Connection, Sequence[str], int], Awaitable[list[Job]]]


def retry_delay(attempts: int) -> float:
    """Backoff for a job whose handler raised: 1, 2, 4 ... seconds, at most 60."""
    return float(min(2 ** max(attempts - 1, 0), 60))
