"""Structured logs: durable logs with the standard `logging` module and puts its fields
(run_id, workflow, node, attempt, job_id, ...) in each record's `extra`.

`main()` logs one JSON object per line while a run retries a step, against `DURABLE_DSN`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from typing import TextIO

import durable

# --8<-- [start:formatter]
FIELDS = ("run_id", "workflow", "node", "attempt", "job_id", "task", "worker", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with durable's structured fields when a record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        return json.dumps(entry, default=str)


def configure_logging(stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("durable")  # durable.worker, durable.runner, durable.engine...
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# --8<-- [end:formatter]

flaky = durable.Workflow("flaky")


@flaky.step(backoff=0.05)
async def call_partner(ctx: durable.Context) -> str:
    if ctx.attempt < 2:
        raise TimeoutError("partner API did not answer")
    return "ok"


async def main() -> None:
    out = io.StringIO()
    configure_logging(out)
    engine = durable.Engine(os.environ["DURABLE_DSN"], workflows=[flaky])
    async with engine, engine.worker(concurrency=2, poll_interval=0.1):
        run_id = await engine.start("flaky")
        await engine.wait(run_id, timeout=30)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    retried = next(e for e in lines if e["logger"] == "durable.runner" and "attempt" in e)
    assert retried["run_id"] == run_id
    assert retried["workflow"] == "flaky"
    assert retried["node"] == "call_partner"
    assert retried["attempt"] == 1
    print(json.dumps(retried))


if __name__ == "__main__":
    asyncio.run(main())
