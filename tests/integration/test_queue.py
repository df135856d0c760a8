"""The job queue on its own (durable/queue.py + sql/queries.sql), against a real PostgreSQL.

Every operation joins the caller's transaction: enqueueing commits or rolls back with the
caller's writes, a claim's row lock is the job's ownership for exactly as long as the
claiming transaction lives, and the job row disappears in the transaction that commits its
work.
"""

from __future__ import annotations

import asyncpg
import pytest

from durable.errors import SerializationError
from durable.queue import Job, JobQueue
from durable.sql import Queries

Q = "q"


@pytest.fixture
def jobs() -> JobQueue:
    return JobQueue(Queries("durable"))


async def job_row(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, attempts, run_at, lease_token, payload::text AS payload"
        " FROM durable.jobs WHERE id = $1",
        job_id,
    )


# -- enqueue -------------------------------------------------------------------------------


async def test_enqueue_rolls_back_with_the_callers_transaction(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")

        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO orders VALUES (1)")
        rolled_back = await jobs.enqueue(conn, Q, "ship", {"order": 1})
        await tx.rollback()

        assert await job_row(conn, rolled_back) is None
        assert await jobs.count(conn) == 0
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0

        async with conn.transaction():
            await conn.execute("INSERT INTO orders VALUES (2)")
            committed = await jobs.enqueue(conn, Q, "ship", {"order": 2})

        assert await jobs.count(conn) == 1
        row = await job_row(conn, committed)
        assert row is not None
        assert row["attempts"] == 0
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1


async def test_enqueue_is_invisible_to_other_connections_until_commit(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as writer, pool.acquire() as reader:
        async with writer.transaction():
            await jobs.enqueue(writer, Q, "t", {"i": 1})
            async with reader.transaction():
                assert await jobs.claim(reader, [Q]) is None
        async with reader.transaction():
            claimed = await jobs.claim(reader, [Q])
            assert claimed is not None
            assert claimed.payload == {"i": 1}


async def test_enqueue_stores_every_field(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO durable.runs (id, workflow, input) VALUES ('R1', 'wf', '{}')"
        )
        job_id = await jobs.enqueue(
            conn, Q, "charge", {"amount": 12.5, "note": "ünïcode"}, run_id="R1", priority=7
        )
        async with conn.transaction():
            job = await jobs.claim(conn, [Q])
        assert job == Job(
            id=job_id,
            queue=Q,
            task="charge",
            run_id="R1",
            payload={"amount": 12.5, "note": "ünïcode"},
            priority=7,
            attempts=0,
            lease_token=None,
        )


async def test_enqueue_refuses_a_payload_that_is_not_json(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(SerializationError, match="payload of job 'bad'"):
            await jobs.enqueue(conn, Q, "bad", {"when": object()})
        with pytest.raises(SerializationError, match="NUL"):
            await jobs.enqueue(conn, Q, "bad", {"text": "a\x00b"})
        assert await jobs.count(conn) == 0


# -- claim order ---------------------------------------------------------------------------


async def test_claim_takes_higher_priority_first_then_earlier_run_at(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        # delay < 0 puts run_at in the past, so every job is due but their run_at differ.
        late_low = await jobs.enqueue(conn, Q, "t", {"n": "late_low"}, delay=-1)
        early_low = await jobs.enqueue(conn, Q, "t", {"n": "early_low"}, delay=-5)
        late_high = await jobs.enqueue(conn, Q, "t", {"n": "late_high"}, delay=-1, priority=5)
        early_high = await jobs.enqueue(conn, Q, "t", {"n": "early_high"}, delay=-3, priority=5)
        urgent = await jobs.enqueue(conn, Q, "t", {"n": "urgent"}, priority=10)
        negative = await jobs.enqueue(conn, Q, "t", {"n": "negative"}, delay=-60, priority=-1)
        await jobs.enqueue(conn, Q, "t", {"n": "future"}, delay=60, priority=100)
        await jobs.enqueue(conn, "other", "t", {"n": "other queue"}, priority=100)

        order = []
        while True:
            async with conn.transaction():
                job = await jobs.claim(conn, [Q])
                if job is None:
                    break
                order.append(job.id)
                await jobs.delete(conn, job.id)

        assert order == [urgent, early_high, late_high, early_low, late_low, negative]
        # The future job and the job of another queue were never claimed.
        assert await jobs.count(conn) == 2


async def test_claim_breaks_run_at_ties_by_id(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():  # one transaction: one now(), so equal run_at
            ids = [await jobs.enqueue(conn, Q, "t", {"i": i}) for i in range(5)]
        claimed = []
        for _ in ids:
            async with conn.transaction():
                job = await jobs.claim(conn, [Q])
                assert job is not None
                claimed.append(job.id)
                await jobs.delete(conn, job.id)
        assert claimed == ids


async def test_claim_only_returns_jobs_of_the_requested_queues(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        a = await jobs.enqueue(conn, "a", "t")
        b = await jobs.enqueue(conn, "b", "t")
        await jobs.enqueue(conn, "c", "t")
        async with conn.transaction():
            assert await jobs.claim(conn, ["x"]) is None
            assert await jobs.claim(conn, []) is None
        got = set()
        for _ in range(2):
            async with conn.transaction():
                job = await jobs.claim(conn, ["a", "b"])
                assert job is not None
                got.add(job.id)
                await jobs.delete(conn, job.id)
        assert got == {a, b}
        async with conn.transaction():
            assert await jobs.claim(conn, ["a", "b"]) is None


async def test_a_delayed_job_is_not_claimed_before_its_run_at(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t", delay=30)
        run_at_minus_now = await conn.fetchval(
            "SELECT EXTRACT(EPOCH FROM run_at - now())::float8 FROM durable.jobs WHERE id = $1",
            job_id,
        )
        assert 29 < run_at_minus_now <= 30
        async with conn.transaction():
            assert await jobs.claim(conn, [Q]) is None
            assert await jobs.claim_by_id(conn, job_id) is None
        due, held = await jobs.due_state(conn, [Q])
        assert due is not None
        assert 29 < due <= 30
        assert held is False


async def test_due_state(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        assert await jobs.due_state(conn, [Q]) == (None, False)
        await jobs.enqueue(conn, Q, "t", delay=20)
        await jobs.enqueue(conn, Q, "t", delay=10)
        await jobs.enqueue(conn, "other", "t", delay=1)
        due, held = await jobs.due_state(conn, [Q])
        assert due is not None
        assert 9 < due <= 10
        assert held is False

        # A due job that another transaction holds (in flight elsewhere) does not make the
        # next delayed job due sooner, but is reported: if its worker dies it comes free
        # without a NOTIFY, so an idle worker looks again soon.
        await jobs.enqueue(conn, Q, "t")
        async with pool.acquire() as holder, holder.transaction():
            assert await jobs.claim(holder, [Q]) is not None
            async with conn.transaction():
                assert await jobs.claim(conn, [Q]) is None
                due, held = await jobs.due_state(conn, [Q])
            assert due is not None
            assert 9 < due <= 10
            assert held is True


# -- SKIP LOCKED ---------------------------------------------------------------------------


async def test_concurrent_claims_get_different_jobs(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        first = await jobs.enqueue(conn, Q, "t", {"i": 1})
        second = await jobs.enqueue(conn, Q, "t", {"i": 2})

    async with pool.acquire() as a, pool.acquire() as b:
        tx_a, tx_b = a.transaction(), b.transaction()
        await tx_a.start()
        await tx_b.start()
        try:
            job_a = await jobs.claim(a, [Q])
            job_b = await jobs.claim(b, [Q])
            assert job_a is not None
            assert job_b is not None
            assert {job_a.id, job_b.id} == {first, second}
            # Both are held: a third transaction finds nothing, without waiting.
            async with pool.acquire() as c, c.transaction():
                assert await jobs.claim(c, [Q]) is None
        finally:
            await tx_a.rollback()
            await tx_b.rollback()


async def test_a_locked_job_is_skipped_and_claimable_again_after_rollback(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        urgent = await jobs.enqueue(conn, Q, "t", priority=1)
        normal = await jobs.enqueue(conn, Q, "t")

    async with pool.acquire() as holder, pool.acquire() as other:
        tx = holder.transaction()
        await tx.start()
        held = await jobs.claim(holder, [Q])
        assert held is not None
        assert held.id == urgent
        async with other.transaction():
            skipped_to = await jobs.claim(other, [Q])
            assert skipped_to is not None
            assert skipped_to.id == normal
            assert await jobs.claim_by_id(other, urgent) is None
        await tx.rollback()
        async with other.transaction():
            again = await jobs.claim(other, [Q])
            assert again is not None
            assert again.id == urgent
            assert again.attempts == 0


async def test_claim_by_id_locks_one_due_free_job(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t", {"k": "v"})
        async with conn.transaction():
            job = await jobs.claim_by_id(conn, job_id)
            assert job is not None
            assert job.payload == {"k": "v"}
            async with pool.acquire() as other, other.transaction():
                assert await jobs.claim_by_id(other, job_id) is None
                assert await jobs.claim(other, [Q]) is None
        async with conn.transaction():
            assert await jobs.claim_by_id(conn, job_id + 1000) is None


# -- settling ------------------------------------------------------------------------------


async def test_job_is_deleted_in_the_transaction_that_commits_its_work(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE effects (item int)")
        job_id = await jobs.enqueue(conn, Q, "t", {"item": 1})

        # Work that rolls back takes the deletion with it: the job is back, no effect.
        tx = conn.transaction()
        await tx.start()
        job = await jobs.claim(conn, [Q])
        assert job is not None
        await conn.execute("INSERT INTO effects VALUES ($1)", job.payload["item"])
        await jobs.delete(conn, job.id)
        await tx.rollback()
        assert await job_row(conn, job_id) is not None
        assert await conn.fetchval("SELECT count(*) FROM effects") == 0

        # Work that commits takes the job row away in the same commit.
        async with pool.acquire() as observer:
            tx = conn.transaction()
            await tx.start()
            job = await jobs.claim(conn, [Q])
            assert job is not None
            await conn.execute("INSERT INTO effects VALUES ($1)", job.payload["item"])
            await jobs.delete(conn, job.id)
            # Before the commit, another connection still sees the job and no effect.
            assert await observer.fetchval("SELECT count(*) FROM durable.jobs") == 1
            assert await observer.fetchval("SELECT count(*) FROM effects") == 0
            await tx.commit()
            assert await observer.fetchval("SELECT count(*) FROM durable.jobs") == 0
            assert await observer.fetchval("SELECT count(*) FROM effects") == 1


async def test_retry_counts_the_attempt_and_delays_the_job(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t")
        before = await job_row(conn, job_id)
        assert before is not None
        async with conn.transaction():
            assert await jobs.retry(conn, job_id, 30) == 1
            ahead = await conn.fetchval(
                "SELECT EXTRACT(EPOCH FROM run_at - now())::float8 FROM durable.jobs WHERE id = $1",
                job_id,
            )
            assert ahead == pytest.approx(30, abs=0.01)
        after = await job_row(conn, job_id)
        assert after is not None
        assert after["attempts"] == 1
        assert after["run_at"] > before["run_at"]
        async with conn.transaction():
            assert await jobs.claim(conn, [Q]) is None
        async with conn.transaction():
            assert await jobs.retry(conn, job_id, 0) == 2


async def test_retry_leaves_a_job_held_by_another_transaction_alone(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t")
    async with pool.acquire() as holder, pool.acquire() as other:
        async with holder.transaction():
            assert await jobs.claim(holder, [Q]) is not None
            async with other.transaction():
                assert await jobs.retry(other, job_id, 5) is None
        row = await job_row(other, job_id)
        assert row is not None
        assert row["attempts"] == 0


async def test_reschedule_sets_a_new_payload_and_run_at(pool: asyncpg.Pool, jobs: JobQueue) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t", {"v": 1})
        async with conn.transaction():
            job = await jobs.claim(conn, [Q])
            assert job is not None
            await jobs.reschedule(conn, job.id, 10, {"v": 2})
        async with conn.transaction():
            assert await jobs.claim(conn, [Q]) is None
        async with conn.transaction():
            await jobs.reschedule(conn, job_id, 0, {"v": 3})
        async with conn.transaction():
            job = await jobs.claim(conn, [Q])
            assert job is not None
            assert job.payload == {"v": 3}
            assert job.attempts == 0


async def test_lease_hides_the_job_until_it_lapses_and_only_its_holder_settles_it(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t")
        async with conn.transaction():
            job = await jobs.claim(conn, [Q])
            assert job is not None
            token = await jobs.lease(conn, job.id, 30)
        async with conn.transaction():
            assert await jobs.claim(conn, [Q]) is None
        row = await job_row(conn, job_id)
        assert row is not None
        assert row["attempts"] == 1
        assert row["lease_token"] == token

        assert await jobs.extend_lease(conn, job_id, token, 60)
        other_token = type(token)(int=token.int ^ 1)
        assert not await jobs.extend_lease(conn, job_id, other_token, 60)
        async with conn.transaction():
            assert await jobs.claim_leased(conn, job_id, other_token) is None
            held = await jobs.claim_leased(conn, job_id, token)
            assert held is not None
            assert held.lease_token == token
            await jobs.delete(conn, job_id)
        assert await jobs.count(conn) == 0


async def test_a_lapsed_lease_is_claimable_and_the_old_holder_loses_it(
    pool: asyncpg.Pool, jobs: JobQueue
) -> None:
    async with pool.acquire() as conn:
        job_id = await jobs.enqueue(conn, Q, "t")
        async with conn.transaction():
            assert await jobs.claim(conn, [Q]) is not None
            token = await jobs.lease(conn, job_id, 0)  # lapses at once
        async with conn.transaction():
            job = await jobs.claim(conn, [Q])
            assert job is not None
            assert job.attempts == 1
            # The new holder retries it: that clears the old lease.
            assert await jobs.retry(conn, job_id, 0) == 2
        assert not await jobs.extend_lease(conn, job_id, token, 30)
        async with conn.transaction():
            assert await jobs.claim_leased(conn, job_id, token) is None
