"""The capacity model's figures: what one step costs the database and the worker, in CPU
time, alone and with a streaming standby; how many connections a worker holds.

    python -m benchmarks.capacity [--quick] [--json PATH]

Wall-clock rates on a shared machine say more about the neighbours than about durable, so
this measures CPU time: the PostgreSQL server's (the postmaster and every backend, from
`/proc`) and this process's (the worker and the client, `getrusage`) while a fan-out runs
(runs x no-op steps, all started first, one in-process worker). Steps per server
CPU-second is what one fully used PostgreSQL vCPU sustains; steps per worker CPU-second,
what one fully used worker core sustains.

Three set-ups, each on fresh servers built with the same local binaries, median of 3
interleaved rounds: a primary alone, a primary with an asynchronous streaming standby, and
one with a synchronous standby (`synchronous_commit=on`). The standby comes from
`tests/cluster.py` (`initdb`, `pg_basebackup -R`, `pg_ctl`), so this needs the local
server binaries and Linux `/proc`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

import durable
from benchmarks import workflows
from benchmarks.common import progress, start_many, wait_all_finished
from durable.cli import run_async
from tests.cluster import SKIP_REASON, Cluster, Server, replication_bin_dir

TICK = os.sysconf("SC_CLK_TCK")
APP = "capacity-worker"


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # the fields after "pid (comm)"


def server_cpu(server: Server) -> float:
    """CPU seconds used so far by a server: its postmaster, the postmaster's reaped
    children (backends that exited) and its live children."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    fields = _stat(postmaster)
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            child = _stat(int(entry))
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(child[1]) == postmaster:
            ticks += int(child[11]) + int(child[12])
    return ticks / TICK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def servers(bin_dir: Path, standby: str) -> Iterator[tuple[Server, Server | None, str]]:
    """The primary (and standby, unless `standby == "none"`) and the primary's DSN."""
    if standby == "none":
        alone = Server(bin_dir=bin_dir)
        with alone:
            yield alone, None, alone.dsn
        return
    with Cluster(bin_dir, synchronous=standby == "sync") as cluster:
        yield cluster.primary, cluster.standby, cluster.single(cluster.primary)


async def _connections(dsn: str, seen: list[int], stop: asyncio.Event) -> None:
    """Sample how many connections the engine and its worker hold, until `stop`."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            n: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP
            )
            seen.append(n)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def measure(
    bin_dir: Path, standby: str, *, runs: int, steps: int, concurrency: int
) -> dict[str, Any]:
    """One fan-out on fresh servers; CPU seconds per step of the primary, the standby and
    this process, steps/s, and the most connections the engine and its worker held."""
    with servers(bin_dir, standby) as (primary, replica, dsn):
        engine = durable.Engine(
            f"{dsn}?application_name={APP}",
            workflows=[workflows.fanout(steps)],
            pool_size=16,
        )
        async with engine:
            watch = await asyncpg.connect(dsn)
            try:
                if standby != "none":
                    await _wait_replication(watch, standby)
                ids = await start_many(engine, workflows.FANOUT, runs, callers=16)
                seen: list[int] = []
                stop = asyncio.Event()
                sampler = asyncio.create_task(_connections(dsn, seen, stop))
                await asyncio.sleep(0.2)
                engine_connections = max(seen, default=0)  # the engine's pool, no worker yet
                cpu0, own0 = server_cpu(primary), own_cpu()
                standby0 = server_cpu(replica) if replica is not None else 0.0
                t0 = time.perf_counter()
                async with engine.worker(concurrency=concurrency):
                    t1 = await wait_all_finished(watch, min(ids), runs, timeout=600)
                    cpu1, own1 = server_cpu(primary), own_cpu()
                    standby1 = server_cpu(replica) if replica is not None else 0.0
                stop.set()
                await sampler
            finally:
                await watch.close()
    total = runs * steps
    seconds = t1 - t0
    result = {
        "standby": standby,
        "steps": total,
        "seconds": round(seconds, 2),
        "steps_per_s": round(total / seconds),
        "primary_cpu_s": round(cpu1 - cpu0, 2),
        "steps_per_primary_cpu_s": round(total / (cpu1 - cpu0)),
        "worker_cpu_s": round(own1 - own0, 2),
        "steps_per_worker_cpu_s": round(total / (own1 - own0)),
        "standby_cpu_s": round(standby1 - standby0, 2) if replica is not None else None,
        "engine_connections": engine_connections,
        "worker_connections": max(seen, default=0) - engine_connections,
        "concurrency": concurrency,
    }
    progress(f"capacity {standby}: {result}")
    return result


async def _wait_replication(conn: asyncpg.Connection, standby: str) -> None:
    wanted = "sync" if standby == "sync" else "async"
    for _ in range(600):
        state = await conn.fetchval(
            "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
        )
        if state == wanted:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the standby is not streaming as {wanted}")


SETUPS = ("none", "async", "sync")


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median steps per primary CPU-second, with every round's rates."""
    ordered = sorted(samples, key=lambda r: r["steps_per_primary_cpu_s"])
    return {
        **ordered[len(ordered) // 2],
        "rounds": len(samples),
        "all_steps_per_primary_cpu_s": [r["steps_per_primary_cpu_s"] for r in samples],
        "all_steps_per_s": [r["steps_per_s"] for r in samples],
    }


async def main(args: argparse.Namespace) -> int:
    bin_dir = replication_bin_dir()
    if bin_dir is None:
        print(f"capacity: {SKIP_REASON}", file=sys.stderr)
        return 2
    runs = 200 if args.quick else 500
    rounds = 1 if args.quick else 3
    load0 = os.getloadavg()
    # Rounds interleave the set-ups, so that a noisy minute hits all three alike.
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    for _ in range(rounds):
        for standby in SETUPS:
            samples[standby].append(
                await measure(bin_dir, standby, runs=runs, steps=10, concurrency=16)
            )
    results = [_median(samples[s]) for s in SETUPS]
    report = {
        "binaries": str(bin_dir),
        "cpus": os.cpu_count(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "results": results,
    }
    header = (
        "| standby | steps/s | steps per primary CPU-s | steps per worker CPU-s "
        "| standby CPU-s per 1,000 steps | connections: engine, worker |"
    )
    print(header)
    print("|---|---|---|---|---|---|")
    for r in results:
        per_k = (
            f"{1000 * r['standby_cpu_s'] / r['steps']:.2f}"
            if r["standby_cpu_s"] is not None
            else "-"
        )
        print(
            f"| {r['standby']} | {r['steps_per_s']:,} | {r['steps_per_primary_cpu_s']:,} "
            f"| {r['steps_per_worker_cpu_s']:,} | {per_k} "
            f"| {r['engine_connections']}, {r['worker_connections']} |"
        )
    print(
        f"load average {load0[0]:.1f} at the start, {report['load_average_end'][0]:.1f} at the end"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="200 runs instead of 500, one round instead of 3"
    )
    parser.add_argument("--json", type=Path, default=None)
    sys.exit(run_async(main(parser.parse_args())))
