"""durable's INFO lines in an app served by uvicorn: configure the `durable` logger.

uvicorn sets up only its own loggers; this is what the app module adds. Run it with
`python docs/examples/uvicorn_logging.py` (it uses `DURABLE_DSN`): the run's log lines go
to stderr with their run id.
"""

import asyncio
import logging
import os

import durable
from durable.cli import DEFAULT_LOG_FORMAT, FieldFormatter

handler = logging.StreamHandler()
handler.setFormatter(FieldFormatter(DEFAULT_LOG_FORMAT))  # appends run_id, workflow, node...
logging.getLogger("durable").addHandler(handler)
logging.getLogger("durable").setLevel(logging.INFO)

hello = durable.Workflow("hello")


@hello.step
async def greet(ctx: durable.Context) -> str:
    return f"hello {ctx.input['name']}"


async def main() -> None:
    engine = durable.Engine(os.environ["DURABLE_DSN"], workflows=[hello])
    async with engine, engine.worker(concurrency=2):
        run_id = await engine.start("hello", {"name": "ann"})
        print(await engine.wait(run_id, timeout=30))  # stderr: "... run 01J... completed"


if __name__ == "__main__":
    asyncio.run(main())
