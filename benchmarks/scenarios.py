"""The durable scenarios of issue 6. Each takes a fresh database DSN and the sizes, drives
durable through its public API only (plus plain SQL for setting up and watching), and returns
its figures as a dict. Timings use `time.perf_counter()`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg

import durable
from benchmarks import workflows
from benchmarks.common import BackendCpu, Sizes, cpu_per, progress, start_many, wait_all_finished

REPO = Path(__file__).resolve().parent.parent


def _rate_line(label: str, count: int, unit: str, seconds: float) -> str:
    return f"{label}: {count / seconds:,.0f} {unit}/s ({count} in {seconds:.2f} s)"


# -- chain ---------------------------------------------------------------------------------


async def chain(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """One run of `chain_steps` no-op steps: steps/s from start() to wait() returning.

    A one-step run goes through first (untimed) so the worker's connections, the wait
    listener and the statement caches are warm: the figure is the steady state.
    """
    wf = workflows.chain(sizes.chain_steps)
    engine = durable.Engine(dsn, workflows=[wf, workflows.one_step()])
    async with engine, engine.worker(**sizes.worker_options()):
        await engine.wait(await engine.start(workflows.ONE_STEP), timeout=30)
        progress(f"chain: one run of {sizes.chain_steps} steps")
        # Its own connection, not one of the engine's pool the measured calls use.
        watch = await asyncpg.connect(dsn)
        try:
            cpu = BackendCpu(watch)
            await cpu.begin()
            t0 = time.perf_counter()
            run_id = await engine.start(workflows.CHAIN)
            await engine.wait(run_id, timeout=sizes.scenario_timeout)
            elapsed = time.perf_counter() - t0
            used = await cpu.end()
        finally:
            await watch.close()
    progress(_rate_line("chain", sizes.chain_steps, "steps", elapsed))
    return {
        **cpu_per(used, sizes.chain_steps, cpu.process),
        "value": sizes.chain_steps / elapsed,
        "unit": "steps/s",
        "steps": sizes.chain_steps,
        "seconds": elapsed,
    }


# -- loop ----------------------------------------------------------------------------------


async def loop(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """One run of a loop of `loop_iterations` no-op iterations: how much slower the last
    tenth of the iterations runs than the first tenth (1.0: each iteration costs O(1))."""
    marks: list[float] = []
    n = sizes.loop_iterations
    engine = durable.Engine(dsn, workflows=[workflows.loop(n, marks), workflows.one_step()])
    async with engine, engine.worker(**sizes.worker_options()):
        await engine.wait(await engine.start(workflows.ONE_STEP), timeout=30)
        progress(f"loop: one run of {n} iterations")
        t0 = time.perf_counter()
        await engine.wait(await engine.start(workflows.LOOP), timeout=sizes.scenario_timeout)
        elapsed = time.perf_counter() - t0
    tenth = n // 10
    first = marks[tenth] - marks[0]
    last = marks[n] - marks[n - tenth]
    progress(f"loop: {n / elapsed:,.0f} iterations/s; last / first tenth {last / first:.2f}")
    return {"value": last / first, "iterations_per_s": n / elapsed, "iterations": n}


# -- fan-out (also the measurement of the scale scenario) ----------------------------------


async def _fanout_once(
    engine: durable.Engine, watch: asyncpg.Connection, sizes: Sizes, label: str
) -> dict[str, Any]:
    runs, steps = sizes.fanout_runs, sizes.fanout_steps
    progress(f"{label}: starting {runs} runs x {steps} steps (no worker yet)")
    ids = await start_many(engine, workflows.FANOUT, runs, callers=sizes.start_callers)
    cpu = BackendCpu(watch)
    await cpu.begin()
    t0 = time.perf_counter()
    async with engine.worker(**sizes.worker_options()):
        t1 = await wait_all_finished(watch, min(ids), runs, timeout=sizes.scenario_timeout)
        used = await cpu.end()
    elapsed = t1 - t0
    progress(_rate_line(label, runs * steps, "steps", elapsed))
    return {
        "value": runs * steps / elapsed,
        "seconds": elapsed,
        **cpu_per(used, runs * steps, cpu.process),
    }


async def _fanout(
    dsn: str,
    sizes: Sizes,
    label: str,
    wf: durable.Workflow | None = None,
    limits: dict[str, durable.Limit] | None = None,
) -> dict[str, Any]:
    wf = wf or workflows.fanout(sizes.fanout_steps)
    engine = durable.Engine(dsn, workflows=[wf], pool_size=16, limits=limits)
    async with engine:
        watch = await asyncpg.connect(dsn)
        try:
            samples = [
                await _fanout_once(engine, watch, sizes, label) for _ in range(sizes.repeats)
            ]
        finally:
            await watch.close()
    rates = [s["value"] for s in samples]
    return {
        "value": statistics.median(rates),
        "unit": "steps/s",
        "runs": sizes.fanout_runs,
        "steps_per_run": sizes.fanout_steps,
        "concurrency": sizes.concurrency,
        "samples": rates,
        "seconds": [s["seconds"] for s in samples],
        **_median_cpu(samples),
    }


def _median_cpu(samples: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in ("pg_cpu_us", "py_cpu_us"):
        values = [s[key] for s in samples if key in s]
        if values:
            out[key] = statistics.median(values)
    return out


async def fanout(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """`fanout_runs` runs x `fanout_steps` no-op steps, all started before one in-process
    worker starts; steps/s from the worker's start to the last run's completion (seen by
    polling the runs table every 10 ms). Median of `repeats` rounds."""
    return await _fanout(dsn, sizes, "fan-out")


async def fanout_keyed(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """The fan-out, its workflow bounded to one active run per key over 1,000 keys (runs
    take a slot at start and give it to the next of their key as they finish)."""
    return await _fanout(dsn, sizes, "fan-out-keyed", workflows.fanout_keyed(sizes.fanout_steps))


async def fanout_limited(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """The fan-out, every step taking a token of a rate limit set far above the achievable
    rate (the cost of the limit's bookkeeping, not of waiting): each such step leaves the
    two-round-trip path (a claim instead of a re-lock, and the token's round trip)."""
    wf = workflows.fanout_limited(sizes.fanout_steps, sizes.fanout_steps)
    return await _fanout(dsn, sizes, "fan-out-limited", wf, workflows.bench_limits())


async def fanout_limited_one(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """The fan-out with one step of each run (the first) under that rate limit: a run that
    makes one rate-limited call among plain steps."""
    wf = workflows.fanout_limited(sizes.fanout_steps, 1)
    return await _fanout(dsn, sizes, "fan-out-limited-1", wf, workflows.bench_limits())


# -- drain ---------------------------------------------------------------------------------


async def drain(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """`drain_runs` one-step runs started before the worker; runs/s until all completed."""
    n = sizes.drain_runs
    engine = durable.Engine(dsn, workflows=[workflows.one_step()], pool_size=16)
    async with engine:
        progress(f"drain: starting {n} one-step runs (no worker yet)")
        ids = await start_many(engine, workflows.ONE_STEP, n, callers=sizes.start_callers)
        watch = await asyncpg.connect(dsn)
        try:
            progress("drain: worker started")
            cpu = BackendCpu(watch)
            await cpu.begin()
            t0 = time.perf_counter()
            async with engine.worker(**sizes.worker_options()):
                t1 = await wait_all_finished(watch, min(ids), n, timeout=sizes.scenario_timeout)
                used = await cpu.end()
        finally:
            await watch.close()
    elapsed = t1 - t0
    progress(_rate_line("drain", n, "runs", elapsed))
    return {
        "value": n / elapsed,
        "unit": "runs/s",
        "runs": n,
        "seconds": elapsed,
        **cpu_per(used, n, cpu.process),
    }


# -- start ---------------------------------------------------------------------------------


async def start(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """`engine.start` from `start_callers` concurrent tasks (engine pool sized to match),
    no worker running; runs/s. One untimed start per caller warms the pool first."""
    n, callers = sizes.start_runs, sizes.start_callers
    engine = durable.Engine(dsn, workflows=[workflows.one_step()], pool_size=callers)
    async with engine:
        await start_many(engine, workflows.ONE_STEP, callers, callers=callers)
        progress(f"start: {n} starts from {callers} callers")
        # Its own connection: the engine's pool is sized to the callers.
        watch = await asyncpg.connect(dsn)
        try:
            cpu = BackendCpu(watch)
            await cpu.begin()
            t0 = time.perf_counter()
            await start_many(engine, workflows.ONE_STEP, n, callers=callers)
            elapsed = time.perf_counter() - t0
            used = await cpu.end()
        finally:
            await watch.close()
    progress(_rate_line("start", n, "runs", elapsed))
    return {
        **cpu_per(used, n, cpu.process),
        "value": n / elapsed,
        "unit": "runs/s",
        "runs": n,
        "callers": callers,
        "seconds": elapsed,
    }


# -- latency -------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


async def latency(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """start -> wait() result of a one-step run with an idle worker running; sequential
    samples with a 10 ms pause between them (untimed) so the worker is idle each time.
    Five untimed samples warm connections and the wait listener first."""
    engine = durable.Engine(dsn, workflows=[workflows.one_step()])
    samples: list[float] = []
    async with engine, engine.worker(**sizes.worker_options()):
        for _ in range(5):
            await engine.wait(await engine.start(workflows.ONE_STEP), timeout=30)
        progress(f"latency: {sizes.latency_samples} sequential samples")
        for _ in range(sizes.latency_samples):
            await anyio.sleep(0.01)
            t0 = time.perf_counter()
            run_id = await engine.start(workflows.ONE_STEP)
            await engine.wait(run_id, timeout=30)
            samples.append((time.perf_counter() - t0) * 1000)
    p50, p99 = _percentile(samples, 50), _percentile(samples, 99)
    progress(f"latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(samples):.2f} ms")
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": statistics.fmean(samples),
        "max_ms": max(samples),
        "samples": len(samples),
    }


# -- scale ---------------------------------------------------------------------------------

# Old finished runs, as the engine leaves them: spread over the months before this one
# (`Sizes.scale_months`; 3, as a 90-day retention keeps), each month's in its own
# partition of the history tables (sql/schema.sql), with ids
# of that month's ULID prefix ($4); the benchmark's own runs, made now, go to this month's.
# A month is loaded as ensure_partitions_v1 makes one, but with its rows in between: its
# tables made on their own, filled (one INSERT ... SELECT generate_series per chunk), then
# attached, which builds their indexes in one pass each (twice as fast as loading the
# attached, indexed partitions).
_MONTH_TABLES = """
CREATE TABLE durable.runs_{m} (LIKE durable.runs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    WITH (fillfactor = 80);
CREATE TABLE durable.journal_{m}
    (LIKE durable.journal INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE TABLE durable.attempts_{m}
    (LIKE durable.attempts INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE TABLE durable.signals_{m}
    (LIKE durable.signals INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
"""

_ATTACH = """
ALTER TABLE durable.{t} ATTACH PARTITION durable.{t}_{m} FOR VALUES FROM ('{lo}') TO ('{hi}')
"""

_OLD_RUNS = """
INSERT INTO durable.runs_{m}
    (id, workflow, status, input, result, cursor, current_node, created_at, updated_at,
     finished_at)
SELECT $4 || lpad(g::text, 16, '0'), $3, 'completed', jsonb_build_object('i', g),
       '{"s0": null, "s1": null}'::jsonb, 2, NULL, t, t + interval '1 second',
       t + interval '1 second'
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT $5::timestamptz + (g - $1) * $6::interval) AS x(t)
"""

_OLD_JOURNAL = """
INSERT INTO durable.journal_{m} (run_id, key, node, status, result, attempts, started_at,
                                 finished_at, seq)
SELECT $3 || lpad(g::text, 16, '0'), k.key, k.key, 'completed', 'null'::jsonb, 1, t, t,
       nextval('{seq}')
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT $4::timestamptz + (g - $1) * $5::interval) AS x(t),
     (VALUES ('s0'), ('s1')) AS k(key)
"""


async def _fill(dsn: str, rows: int, months: int) -> float:
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        chunk = 200_000
        per_month = -(-rows // months)
        # The journal's identity sequence, named once (not looked up for every row).
        seq = await conn.fetchval("SELECT pg_get_serial_sequence('durable.journal', 'seq')")
        done = 0
        for m in range(months, 0, -1):
            start, name, prefix, end, spacing = await conn.fetchrow(
                """
                SELECT s AT TIME ZONE 'UTC', to_char(s, '"y"YYYY"m"MM'),
                       durable.ulid_prefix_v1(s AT TIME ZONE 'UTC'),
                       durable.ulid_prefix_v1((s + interval '1 month') AT TIME ZONE 'UTC'),
                       (s + interval '1 month' - s) / greatest($2::float8, 1)
                FROM (SELECT date_trunc('month', now() AT TIME ZONE 'UTC')
                             - make_interval(months => $1) AS s) AS x  -- in UTC
                """,
                m,
                per_month,
            )
            await conn.execute(_MONTH_TABLES.format(m=name))
            last_of_month = min(rows, done + per_month)
            for first in range(done + 1, last_of_month + 1, chunk):
                last = min(last_of_month, first + chunk - 1)
                begin = start + spacing * (first - done - 1)
                async with conn.transaction():
                    await conn.execute(
                        _OLD_RUNS.replace("{m}", name),
                        first,
                        last,
                        workflows.FANOUT,
                        prefix,
                        begin,
                        spacing,
                    )
                    await conn.execute(
                        _OLD_JOURNAL.replace("{m}", name).replace("{seq}", seq),
                        first,
                        last,
                        prefix,
                        begin,
                        spacing,
                    )
                progress(f"scale: {last:,} of {rows:,} finished runs (and 2 journal rows each)")
            for table in ("runs", "journal", "attempts", "signals"):
                await conn.execute(_ATTACH.format(t=table, m=name, lo=prefix, hi=end))
            progress(f"scale: month {name} attached, its indexes built")
            done = last_of_month
        # VACUUM ANALYZE rather than ANALYZE alone: fresh statistics, and autovacuum has
        # nothing left to do, so it does not start in the middle of the measurement.
        await conn.execute("VACUUM (ANALYZE) durable.runs")
        await conn.execute("VACUUM (ANALYZE) durable.journal")
        # Flush the bulk load now, so its dirty pages are not written back (and full-page
        # images not taken) during the measurement. Needs superuser or pg_checkpoint.
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            progress("scale: no privilege to CHECKPOINT; measuring without one")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def scale(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """The fan-out measurement on a database already holding `scale_rows` finished runs
    and their journal (two rows each) in the partitions of the `scale_months` months before
    this one, inserted with SQL and vacuum-analyzed (`--scale-rows`, `--scale-months`)."""
    engine = durable.Engine(dsn, workflows=[workflows.fanout(sizes.fanout_steps)])
    async with engine:  # migrates the fresh database
        pass
    fill_seconds = await _fill(dsn, sizes.scale_rows, sizes.scale_months)
    result = await _fanout(dsn, sizes, "scale")
    result.update(rows=sizes.scale_rows, months=sizes.scale_months, fill_seconds=fill_seconds)
    result["drop"] = await _drop_oldest_month(dsn)
    return result


async def _drop_oldest_month(dsn: str) -> dict[str, Any]:
    """Drop the oldest month of the filled history (`Engine.drop_history`, with a retention
    that keeps the next month) and time it: what dropping a month costs at that size, the
    whole call (`total_seconds`) and its parts."""
    engine = durable.Engine(dsn)
    async with engine:
        oldest, after = (await engine.history_partitions())[:2]
        assert after.start is not None
        # Every run of the oldest month finished before the next month began (a second
        # after it started, at the latest), most of the next month's after.
        older_than = dt.datetime.now(dt.UTC) - after.start - dt.timedelta(minutes=1)
        t0 = time.perf_counter()
        report = await engine.drop_history(older_than=older_than)
        total = time.perf_counter() - t0
    assert report.dropped == [oldest.name], report
    seconds = report.seconds[oldest.name]
    files = report.files_seconds[oldest.name]
    progress(
        f"dropped month {oldest.name} ({oldest.runs:,} runs) in {total:.3f} s: the history "
        f"tables locked {seconds:.3f} s, its files deleted in {files:.3f} s after"
    )
    return {
        "partition": oldest.name,
        "runs": oldest.runs,
        "seconds": seconds,
        "files_seconds": files,
        "total_seconds": total,
    }


# -- memory --------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB (10**6 bytes; /proc reports KiB)."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024 / 1e6
    return found


async def memory(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """RSS of a worker *process* after it parked `memory_runs` runs on a signal wait."""
    n = sizes.memory_runs
    engine = durable.Engine(dsn, workflows=[workflows.parked()], pool_size=16)
    async with engine:  # migrate before the worker process starts
        paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.worker_proc",
            "--dsn",
            dsn,
            "--concurrency",
            str(sizes.concurrency),
            stdout=asyncio.subprocess.PIPE,
            cwd=str(REPO),
            env=env,
        )
        try:
            assert proc.stdout is not None
            with anyio.fail_after(60):
                line = (await proc.stdout.readline()).decode().strip()
            if not line.startswith("ready"):
                raise RuntimeError(f"worker process did not start (said {line!r})")
            idle = _proc_status(proc.pid)
            progress(
                f"memory: worker pid {proc.pid} idle at {idle['VmRSS']:.1f} MB; "
                f"starting {n} runs that wait for a signal"
            )
            await start_many(engine, workflows.PARKED, n, callers=sizes.start_callers)
            watch = await asyncpg.connect(dsn)
            try:
                with anyio.fail_after(sizes.scenario_timeout):
                    while True:
                        waiting = await watch.fetchval(
                            "SELECT count(*) FROM durable.runs"
                            " WHERE workflow = $1 AND status = 'waiting'",
                            workflows.PARKED,
                        )
                        if waiting >= n:
                            break
                        await anyio.sleep(0.1)
            finally:
                await watch.close()
            await anyio.sleep(0.5)  # let the worker settle after its last park
            parked = _proc_status(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                with anyio.fail_after(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
    progress(
        f"memory: {n} runs parked, worker RSS {parked['VmRSS']:.1f} MB "
        f"(peak {parked['VmHWM']:.1f} MB)"
    )
    return {
        "value": parked["VmRSS"],
        "unit": "MB",
        "runs": n,
        "rss_mb": parked["VmRSS"],
        "peak_mb": parked["VmHWM"],
        "idle_rss_mb": idle["VmRSS"],
    }
