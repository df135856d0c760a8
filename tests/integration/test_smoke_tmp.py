import anyio
from durable.queue import JobQueue
from durable.sql import Queries
from durable.worker import Worker

async def test_smoke(pool):
    q = Queries("durable")
    jq = JobQueue(q)
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE effects (id int primary key)")
        async with conn.transaction():
            for i in range(100):
                await jq.enqueue(conn, "q", "ins", {"i": i})
    async def ins(conn, job):
        await conn.execute("INSERT INTO effects VALUES ($1)", job.payload["i"])
    w = Worker(pool, q, {"ins": ins}, queues=["q"], concurrency=4)
    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        with anyio.fail_after(10):
            while True:
                async with pool.acquire() as conn:
                    if await jq.count(conn) == 0: break
                await anyio.sleep(0.05)
        w.stop()
    async with pool.acquire() as conn:
        assert await conn.fetchval("select count(*) from effects") == 100
