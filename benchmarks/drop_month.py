"""How long dropping a month of history takes: fill the partitions of the months before
this one with finished runs and their journal (as the scale scenario does), then drop the
oldest month with `Engine.drop_history` and report how long the whole call took, how long
the history tables were locked and how long deleting the month's files took afterwards.

    python -m benchmarks.drop_month [--runs N] [--months M]

The database comes from `DURABLE_DSN` when set, else a throwaway local PostgreSQL; a fresh
database of it is made and dropped.
"""

from __future__ import annotations

import argparse
import sys

import durable
from benchmarks.common import fresh_database, progress
from benchmarks.scenarios import _drop_oldest_month, _fill
from durable.cli import run_async
from durable.server import provision


async def measure(server_dsn: str, runs: int, months: int) -> dict[str, object]:
    """The fill's seconds and the drop's figures (`scenarios._drop_oldest_month`)."""
    async with fresh_database(server_dsn, "drop_month") as dsn:
        async with durable.Engine(dsn):  # migrates the fresh database
            pass
        fill_seconds = await _fill(dsn, runs, months)
        drop = await _drop_oldest_month(dsn)  # its "runs": the month's
        return {"filled_runs": runs, "months": months, "fill_seconds": fill_seconds, **drop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drop_month", description=__doc__)
    parser.add_argument("--runs", type=int, default=3_333_333, help="finished runs in all")
    parser.add_argument("--months", type=int, default=2, help="months they are spread over")
    args = parser.parse_args(argv)
    if args.runs < 1 or not 2 <= args.months <= 24:
        parser.error("--runs must be at least 1, --months from 2 to 24")
    with provision("DURABLE_DSN") as server_dsn:
        result = run_async(measure(server_dsn, args.runs, args.months))
    progress(f"result: {result}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
