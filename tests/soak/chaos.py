"""The chaos soak: driver and checker.

    python -m tests.soak.chaos --runs 2000        # `make soak`; exit status 1 on a violation

The driver starts its own PostgreSQL (`durable.server.LocalPostgres`, since it restarts it),
creates and migrates a database, and starts `--workers` worker processes
(`tests/soak/worker_proc.py`, 8 slots each). It then starts `--runs` runs of the `soak`
workflow (`tests/soak/app.py`) over a ramp and, until every run is terminal:

- sends the `approve` signal every run waits for without a timeout, at a random time after
  its start (some runs get it twice), and the `ping` signal that half the runs wait for with
  a timeout, at a random time (before, during or after that wait); every signal sent is
  recorded in `sent_signals` after `engine.signal` returned (or raised: outcome unknown,
  and an `approve` is then sent again);
- cancels the runs whose input says so (`engine.cancel`): a third at a random time after
  their start, the others once they reach a node chosen at random (any of the workflow's);
  half of them as soon as a worker is then seen holding the run's node (its advisory lock),
  some of them twice (at once or a moment later); every call is recorded in `sent_cancels`
  (called_at before the call, the return value or NULL when it raised a connection error:
  outcome unknown);
- retries (`engine.retry`) each run whose input says `heal` once it has failed, after
  inserting its `healed` row (its doomed node then succeeds) and a copy of its journal
  (`journal_before_retry`) in one transaction; calls are recorded in `sent_retries`;
- SIGKILLs a random ready worker every 0.2-1 s and starts a replacement;
- every 2-4 s terminates a random half of the workers' backends (`pg_terminate_backend`),
  and now and then one of the driver's own (the cancels, signals and retries in flight);
- restarts PostgreSQL once (`immediate` by default: a crash and recovery) when 30% of the
  runs are terminal, in the middle of everything else; running workers must ride it out.

Then it lets the workers drain stale jobs, stops them with SIGTERM (they must exit 0) and
runs the checker (`check`), which reads only the database: every run terminal with the
status its input and the driver's cancels predict (retried runs `completed`, in epoch 1);
per epoch, every effect of a step, branch, iteration, route branch and child step committed
in that epoch exactly once and none of an uncommitted or replayed one (a retry re-runs the
failed node and the compensated steps, and replays the rest); every compensator effect
exactly once for failed and cancelled runs, none for completed runs, in reverse completion
order and after every node's commit; a cancelled run's journal is a prefix of the workflow
(nothing ran after the cancel); every signal consumed exactly once by its wait (oldest
first) or legitimately left in the mailbox; one child per child node; no job row, lease or
cancel request left; and the global invariant (`tests.invariant`). `soak()` returns a
`Report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg

import durable
from durable.db import is_connection_error
from durable.migrate import migrate
from durable.server import LocalPostgres
from tests import invariant
from tests.soak import app

REPO = Path(__file__).resolve().parents[2]
DATABASE = "soak"
WORKER_PREFIX = "soak-worker"
TERMINAL = ("completed", "failed", "cancelled")
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0
RESUME_TIMEOUT = 20.0
CANCEL_TIMEOUT = 60.0
#: Fractions of the runs marked `cancel`: cancelled at a random time (else when they reach
#: a node chosen at random), as soon as a node is seen in flight, and cancelled twice.
CANCEL_AT_RANDOM = 1 / 3
CANCEL_IN_FLIGHT = 0.5
CANCEL_TWICE = 0.3
#: Held by a worker on a run's node (claim_v1 takes it shared): pg_locks splits the key.
RUN_LOCK_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) h
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.classid::text::bigint = (h.k >> 32) & 4294967295
      AND l.objid::text::bigint = h.k & 4294967295
)
"""

T = TypeVar("T")


def dsn_for(dsn: str, *, database: str | None = None, **params: str) -> str:
    """`dsn` pointing at another database and/or with extra query parameters."""
    parts = urlsplit(dsn)
    if database is not None:
        parts = parts._replace(path="/" + database)
    if params:
        query = f"{parts.query}&" if parts.query else ""
        parts = parts._replace(query=query + urlencode(params))
    return urlunsplit(parts)


@dataclass
class SoakConfig:
    """What the soak does; `None` fields get defaults scaled to `runs`."""

    runs: int = 2000
    workers: int = 3
    concurrency: int = 8
    poll_interval: float = 0.5
    deadline: float | None = None  # seconds; default max(240, runs * 0.45)
    ramp: float | None = None  # seconds over which runs are started; default runs * 0.04
    seed: int | None = None
    restart_mode: str = "immediate"
    restart_at: float = 0.3  # restart PostgreSQL when this fraction of runs is terminal
    kill_every: tuple[float, float] = (0.2, 1.0)
    terminate_every: tuple[float, float] = (2.0, 4.0)
    workdir: Path | None = None  # worker logs; default a temporary directory
    keep: bool = False  # keep the server's data directory
    progress: bool = True

    def __post_init__(self) -> None:
        if self.deadline is None:
            self.deadline = max(240.0, self.runs * 0.45)
        if self.ramp is None:
            self.ramp = self.runs * 0.04
        if self.seed is None:
            self.seed = random.randrange(1 << 30)


@dataclass
class SoakStats:
    runs: int = 0
    seed: int = 0
    elapsed: float = 0.0
    chaos_seconds: float = 0.0
    kills: int = 0
    kills_in_flight: int = 0
    transactions_killed: int = 0
    spawns: int = 0
    termination_rounds: int = 0
    backends_terminated: int = 0
    restarts: int = 0
    restart_mode: str = ""
    restart_seconds: float = 0.0
    restart_at_terminal: int = 0
    restart_survivors: int = 0
    survivors_resumed: int = 0
    resume_seconds: float = 0.0
    start_retries: int = 0
    signals: Counter[str] = field(default_factory=Counter)
    cancels: Counter[str] = field(default_factory=Counter)
    cancels_in_flight: int = 0
    cancels_twice: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    driver_backends_terminated: int = 0
    effects_rolled_back: int = 0
    worker_outage_logs: int = 0
    worker_recovery_logs: int = 0
    stop_codes: list[int | None] = field(default_factory=list)


class Violations:
    """Violations by category, with the first few examples of each."""

    EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, category: str, example: str) -> None:
        self.counts[category] += 1
        if len(self.examples[category]) < self.EXAMPLES:
            self.examples[category].append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        out = []
        for category, n in sorted(self.counts.items()):
            out.append(f"{category}: {n}")
            out.extend(f"    e.g. {e}" for e in self.examples[category])
        return out


@dataclass
class Report:
    stats: SoakStats
    violations: Violations
    counts: dict[str, int]
    workdir: Path

    @property
    def ok(self) -> bool:
        return not self.violations

    def render(self) -> str:
        s = self.stats
        sig = s.signals
        lines = [
            f"chaos soak: {s.runs} runs (seed {s.seed}) in {s.elapsed:.1f} s "
            f"({s.chaos_seconds:.1f} s under chaos)",
            f"  SIGKILLs: {s.kills} ({s.kills_in_flight} with transactions in flight, "
            f"{s.transactions_killed} open transactions killed); worker processes started: "
            f"{s.spawns}",
            f"  pg_terminate_backend: {s.backends_terminated} worker backends in "
            f"{s.termination_rounds} rounds",
            f"  PostgreSQL restarts: {s.restarts} ({s.restart_mode}, {s.restart_seconds:.1f} s, "
            f"at {s.restart_at_terminal} terminal runs); workers that lived through it and "
            f"committed work afterwards without a restart: {s.survivors_resumed}/"
            f"{s.restart_survivors} (all within {s.resume_seconds:.1f} s of its return)",
            f"  effect inserts rolled back (kills, terminations, restart, failing attempts): "
            f"{s.effects_rolled_back}",
            f"  run starts retried: {s.start_retries}; signals sent: "
            + ", ".join(f"{k} {v}" for k, v in sorted(sig.items())),
            f"  cancels: {sum(s.cancels.values())} calls ("
            + ", ".join(f"{k} {v}" for k, v in sorted(s.cancels.items()))
            + f"), {s.cancels_in_flight} while a worker held the run's node, "
            f"{s.cancels_twice} runs cancelled twice; retries: {sum(s.retries.values())} calls ("
            + ", ".join(f"{k} {v}" for k, v in sorted(s.retries.items()))
            + f"); driver backends terminated: {s.driver_backends_terminated}",
            f"  worker log lines: 'database unavailable' {s.worker_outage_logs}, "
            f"'reachable again' {s.worker_recovery_logs}",
            f"  graceful stop exit codes: {s.stop_codes}",
            "  checked: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()),
        ]
        if self.violations:
            lines.append("VIOLATIONS:")
            lines.extend("  " + line for line in self.violations.lines())
        else:
            lines.append("violations: none (zero lost, zero duplicated effects, zero stuck runs)")
        lines.append(f"  worker logs: {self.workdir}")
        return "\n".join(lines)


# -- worker processes ----------------------------------------------------------------------


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)
    killed: bool = False

    def ready(self) -> bool:
        try:
            return "ready" in self.out.read_text()
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait()

    def stderr_tail(self) -> str:
        try:
            return self.err.read_text()[-1500:]
        except FileNotFoundError:
            return ""


class Fleet:
    def __init__(self, dsn: str, workdir: Path, config: SoakConfig) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.config = config
        self.spawned = 0
        self.live: list[WorkerProc] = []
        self.all: list[WorkerProc] = []

    def spawn(self) -> WorkerProc:
        self.spawned += 1
        name = f"{WORKER_PREFIX}-{self.spawned}"
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        env = {
            **os.environ,
            app.DSN_ENV: dsn_for(self.dsn, application_name=name),
            "SOAK_CONCURRENCY": str(self.config.concurrency),
            "SOAK_POLL_INTERVAL": str(self.config.poll_interval),
            "PYTHONUNBUFFERED": "1",
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.soak.worker_proc"],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        worker = WorkerProc(name, proc, out, err)
        self.live.append(worker)
        self.all.append(worker)
        return worker

    def replace(self, worker: WorkerProc) -> WorkerProc:
        self.live.remove(worker)
        return self.spawn()

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not all(w.ready() for w in self.live):
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in self.live):
                return False
            await asyncio.sleep(0.05)
        return True

    def stop(self) -> list[int | None]:
        for w in self.live:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for w in self.live:
            try:
                codes.append(w.proc.wait(timeout=STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def close(self) -> None:
        for w in self.all:
            with contextlib.suppress(Exception):
                w.kill()


# -- the driver ----------------------------------------------------------------------------


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        assert config.seed is not None
        self.rng = random.Random(config.seed)
        self.stats = SoakStats(runs=config.runs, seed=config.seed, restart_mode=config.restart_mode)
        self.violations = Violations()
        self.run_ids: list[str] = []
        self.done = asyncio.Event()
        self._heap: list[tuple[float, int, str, str, bool]] = []
        self._seq = 0
        self._restart: asyncio.Task[None] | None = None
        self._restart_done = False
        self.holiday = False  # no SIGKILLs or terminations while set (around the restart)
        self.pg: LocalPostgres | None = None
        self.admin: asyncpg.Pool | None = None
        self.engine: durable.Engine | None = None
        self.fleet: Fleet | None = None
        self.dsn = ""
        self.tg: asyncio.TaskGroup | None = None
        # Cancels waiting for their run to reach a node: run id -> (node position, plan).
        self._cancel_at: dict[str, tuple[int, dict[str, Any]]] = {}

    def log(self, text: str) -> None:
        if self.config.progress:
            print(text, flush=True)

    # -- database access that rides out the restart ---------------------------------------

    async def db(
        self,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        once: bool = False,
        timeout: float = 10.0,
    ) -> T | None:
        """Run `fn` on an admin connection; retry connection errors (once: give up, None)."""
        assert self.admin is not None
        give_up = time.monotonic() + 120
        while True:
            try:
                async with asyncio.timeout(timeout), self.admin.acquire() as conn:
                    return await fn(conn)
            except Exception as exc:
                if not (is_connection_error(exc) or isinstance(exc, durable.DatabaseUnavailable)):
                    raise
                if once:
                    return None
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.2)

    async def pause(self, seconds: float) -> None:
        """Sleep, or return early once the soak is done."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.done.wait()

    # -- set-up ---------------------------------------------------------------------------

    async def setup(self, workdir: Path) -> str:
        self.pg = LocalPostgres()
        server_dsn = await asyncio.to_thread(self.pg.start)
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        dsn = dsn_for(server_dsn, database=DATABASE)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, "durable")
            await conn.execute(app.TABLES_SQL)
        finally:
            await conn.close()
        self.admin = await asyncpg.create_pool(
            dsn_for(dsn, application_name="soak-driver-admin"), min_size=1, max_size=6
        )
        self.engine = app.build_engine(dsn_for(dsn, application_name="soak-driver"))
        await self.engine.open(migrate=False)
        self.fleet = Fleet(dsn, workdir, self.config)
        return dsn

    async def teardown(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await self.engine.close()
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.admin.close(), 10)
        if self.pg is not None:
            if self.config.keep:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.pg.stop)
                self.log(f"kept the server's data directory {self.pg.data_dir}")
            else:
                await asyncio.to_thread(self.pg.cleanup)

    # -- the chaos ------------------------------------------------------------------------

    async def drive(self) -> None:
        assert self.fleet is not None
        for _ in range(self.config.workers):
            self.fleet.spawn()
        if not await self.fleet.wait_ready():
            tails = "; ".join(f"{w.name}: {w.stderr_tail()}" for w in self.fleet.live)
            raise RuntimeError(f"the first workers did not become ready: {tails}")
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            tg.create_task(self.starter())
            tg.create_task(self.signaller())
            tg.create_task(self.healer())
            tg.create_task(self.cancel_watch())
            tg.create_task(self.killer())
            tg.create_task(self.terminator())
            await self.monitor(t0)
            self.done.set()
        if self._restart is not None:
            await self._restart
        self.stats.chaos_seconds = time.monotonic() - t0

    async def starter(self) -> None:
        assert self.engine is not None
        cfg = self.config
        assert cfg.ramp is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(cfg.runs):
            await self.pause(t0 + i * cfg.ramp / cfg.runs - loop.time())
            if self.done.is_set():
                return
            inp = app.plan_input(i, self.rng)
            failures = 0
            while True:
                try:
                    run_id = await self.engine.start("soak", inp, idempotency_key=f"soak-{i}")
                    break
                except Exception as exc:
                    # The outcome is unknown (an outage): the idempotency key makes the
                    # retry return the same run if the first start committed.
                    failures += 1
                    self.stats.start_retries += 1
                    if failures > 300:
                        raise RuntimeError(f"cannot start run {i}: {exc!r}") from exc
                    await asyncio.sleep(0.2)
            self.run_ids.append(run_id)
            now = loop.time()
            self.schedule(now + self.rng.uniform(0.2, 3.0), run_id, "approve", resend=True)
            if self.rng.random() < 0.15:
                self.schedule(now + self.rng.uniform(0.0, 6.0), run_id, "approve", resend=False)
            if inp["ping"]:
                self.schedule(now + self.rng.uniform(0.0, 5.0), run_id, "ping", resend=False)
            if inp["cancel"]:
                plan = {
                    "in_flight": self.rng.random() < CANCEL_IN_FLIGHT,
                    "twice": self.rng.choice(("at once", "later"))
                    if self.rng.random() < CANCEL_TWICE
                    else None,
                }
                if self.rng.random() < CANCEL_AT_RANDOM:
                    assert self.tg is not None
                    delay = self.rng.uniform(0.0, 6.0)
                    self.tg.create_task(self.cancel_later(run_id, delay=delay, **plan))
                else:
                    self._cancel_at[run_id] = (self.rng.randrange(len(app.soak.nodes)), plan)

    def schedule(self, due: float, run_id: str, name: str, *, resend: bool) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, run_id, name, resend))

    async def signaller(self) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(8)
        tasks: set[asyncio.Task[None]] = set()
        while not self.done.is_set():
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                _due, seq, run_id, name, resend = heapq.heappop(self._heap)
                task = asyncio.create_task(self.send(limit, seq, run_id, name, resend))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await self.pause(0.02)
        if tasks:
            await asyncio.gather(*tasks)

    async def send(
        self, limit: asyncio.Semaphore, seq: int, run_id: str, name: str, resend: bool
    ) -> None:
        assert self.engine is not None
        payload = {"seq": seq, "name": name}
        async with limit:
            accepted: bool | None
            error: str | None = None
            try:
                accepted = await self.engine.signal(run_id, name, payload)
            except Exception as exc:
                accepted, error = None, repr(exc)[:300]
            # Recorded after engine.signal returned, so sent_at is after the signal committed;
            # retried if the driver's own connection drops (idempotent by seq).
            await self.db(
                lambda c: c.execute(
                    "INSERT INTO sent_signals (seq, run_id, name, payload, accepted, error) "
                    "VALUES ($1, $2, $3, $4::jsonb, $5, $6) ON CONFLICT (seq) DO NOTHING",
                    seq,
                    run_id,
                    name,
                    json.dumps(payload),
                    accepted,
                    error,
                )
            )
        outcome = {True: "accepted", False: "refused", None: "unknown"}[accepted]
        self.stats.signals[f"{name} {outcome}"] += 1
        if accepted is None and resend and not self.done.is_set():
            self.schedule(asyncio.get_running_loop().time() + 1.0, run_id, name, resend=True)

    # -- cancels and retries --------------------------------------------------------------

    async def cancel_watch(self) -> None:
        """Start the cancels of runs that reached (or passed) their chosen node."""
        positions = {n.name: i for i, n in enumerate(app.soak.nodes)}
        while not self.done.is_set():
            await self.pause(0.1)
            if not self._cancel_at or self.done.is_set():
                continue
            rows = await self.db(
                lambda c: c.fetch(
                    "SELECT id, status, current_node FROM durable.runs WHERE id = ANY($1)",
                    list(self._cancel_at),
                ),
                once=True,
                timeout=5.0,
            )
            for r in rows or ():
                at, plan = self._cancel_at[r["id"]]
                here = positions.get(r["current_node"], 0)
                if here >= at or r["status"] not in ("pending", "running", "waiting"):
                    del self._cancel_at[r["id"]]
                    assert self.tg is not None
                    self.tg.create_task(self.cancel_later(r["id"], delay=0.0, **plan))

    async def cancel_later(
        self, run_id: str, *, delay: float, in_flight: bool, twice: str | None
    ) -> None:
        """Cancel `run_id` after `delay` s, or (`in_flight`) as soon as after it a worker is
        seen holding the run's node (for 5 s at most), once or `twice`."""
        loop = asyncio.get_running_loop()
        await self.pause(delay)
        seen = False
        if in_flight:
            until = loop.time() + 5.0
            while not self.done.is_set() and loop.time() < until:
                held = await self.db(
                    lambda c: c.fetchval(RUN_LOCK_HELD, run_id), once=True, timeout=1.0
                )
                if held:
                    seen = True
                    break
                await asyncio.sleep(0.01)
        if self.done.is_set():
            return  # every run is terminal: a cancel would return False
        if seen:
            self.stats.cancels_in_flight += 1
        if twice is not None:
            self.stats.cancels_twice += 1
        if twice == "at once":
            await asyncio.gather(self.cancel(run_id, seen), self.cancel(run_id, False))
            return
        await self.cancel(run_id, seen)
        if twice == "later":
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))
            await self.cancel(run_id, False)

    async def cancel(self, run_id: str, in_flight: bool) -> None:
        """One `engine.cancel`, recorded in `sent_cancels` (called_at before the call)."""
        assert self.engine is not None
        call_id = await self.db(
            lambda c: c.fetchval(
                "INSERT INTO sent_cancels (run_id, in_flight) VALUES ($1, $2) RETURNING id",
                run_id,
                in_flight,
            )
        )
        accepted: bool | None
        error: str | None = None
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                accepted = await self.engine.cancel(run_id, reason=f"soak cancel {call_id}")
        except Exception as exc:
            accepted, error = None, repr(exc)[:300]
            if not (is_connection_error(exc) or isinstance(exc, durable.DatabaseUnavailable)):
                self.violations.add("cancel raised", f"{run_id}: {error}")
        await self.db(
            lambda c: c.execute(
                "UPDATE sent_cancels SET accepted = $2, error = $3, "
                "returned_at = clock_timestamp() WHERE id = $1",
                call_id,
                accepted,
                error,
            )
        )
        self.stats.cancels[{True: "accepted", False: "refused", None: "unknown"}[accepted]] += 1

    async def healer(self) -> None:
        """Retry every failed run whose input says `heal`, once, after healing it."""
        assert self.engine is not None
        while not self.done.is_set():
            await self.pause(self.rng.uniform(0.2, 1.5))
            if self.done.is_set():
                return
            rows = await self.db(
                lambda c: c.fetch(
                    "SELECT id FROM durable.runs WHERE workflow = 'soak' AND status = 'failed' "
                    "AND epoch = 0 AND (input ->> 'heal')::boolean ORDER BY id"
                ),
                once=True,
                timeout=5.0,
            )
            for row in rows or ():
                await self.retry(row["id"])

    async def retry(self, run_id: str) -> None:
        assert self.engine is not None

        async def heal(c: asyncpg.Connection) -> int:
            async with c.transaction():
                await c.execute(
                    "INSERT INTO journal_before_retry "
                    "SELECT run_id, key, status, result, finished_at, seq FROM durable.journal "
                    "WHERE run_id = $1 ON CONFLICT DO NOTHING",
                    run_id,
                )
                await c.execute(
                    "INSERT INTO healed (run_id) VALUES ($1) ON CONFLICT DO NOTHING", run_id
                )
                call_id: int = await c.fetchval(
                    "INSERT INTO sent_retries (run_id) VALUES ($1) RETURNING id", run_id
                )
                return call_id

        call_id = await self.db(heal)
        accepted: bool | None
        error: str | None = None
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                accepted = await self.engine.retry(run_id)
        except Exception as exc:
            # Unknown outcome: still failed (the next scan retries it) or retried.
            accepted, error = None, repr(exc)[:300]
            if not (is_connection_error(exc) or isinstance(exc, durable.DatabaseUnavailable)):
                self.violations.add("retry raised", f"{run_id}: {error}")
        if accepted is False:
            self.violations.add("retry refused a failed run", run_id)
        await self.db(
            lambda c: c.execute(
                "UPDATE sent_retries SET accepted = $2, error = $3, "
                "returned_at = clock_timestamp() WHERE id = $1",
                call_id,
                accepted,
                error,
            )
        )
        self.stats.retries[{True: "accepted", False: "refused", None: "unknown"}[accepted]] += 1

    def check_fleet(self) -> None:
        assert self.fleet is not None
        for w in list(self.fleet.live):
            code = w.proc.poll()
            if code is not None:
                self.violations.add(
                    "worker exited by itself", f"{w.name} exit {code}: {w.stderr_tail()!r}"
                )
                self.fleet.replace(w)
                self.stats.spawns += 1
            elif not w.ready() and time.monotonic() - w.started > READY_TIMEOUT:
                self.violations.add(
                    "worker never ready", f"{w.name} after {READY_TIMEOUT:g} s: {w.stderr_tail()!r}"
                )
                w.kill()
                self.fleet.replace(w)
                self.stats.spawns += 1

    async def killer(self) -> None:
        assert self.fleet is not None
        lo, hi = self.config.kill_every
        while not self.done.is_set():
            await self.pause(self.rng.uniform(lo, hi))
            if self.done.is_set():
                return
            if self.holiday:
                continue
            self.check_fleet()
            ready = [w for w in self.fleet.live if w.ready()]
            if not ready:
                continue
            victim = self.rng.choice(ready)
            busy = await self.db(
                lambda c, name=victim.name: c.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                    "AND backend_xid IS NOT NULL",
                    name,
                ),
                once=True,
                timeout=1.0,
            )
            if self.holiday:
                continue  # the restart began meanwhile: spare the workers living through it
            victim.kill()
            self.fleet.replace(victim)
            self.stats.kills += 1
            self.stats.spawns += 1
            if busy:
                self.stats.kills_in_flight += 1
                self.stats.transactions_killed += busy

    async def terminator(self) -> None:
        lo, hi = self.config.terminate_every
        while not self.done.is_set():
            await self.pause(self.rng.uniform(lo, hi))
            if self.done.is_set():
                return
            if self.holiday:
                continue
            n = await self.db(
                lambda c: c.fetchval(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS t "
                    "FROM pg_stat_activity WHERE application_name LIKE $1 "
                    "AND random() < 0.5) AS s WHERE t",
                    f"{WORKER_PREFIX}%",
                ),
                once=True,
            )
            if n is not None:
                self.stats.termination_rounds += 1
                self.stats.backends_terminated += n
            if self.rng.random() < 0.3:
                # One of the driver engine's connections (a cancel, signal or retry may be in
                # flight on it: its outcome is then unknown to the driver).
                n = await self.db(
                    lambda c: c.fetchval(
                        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS t "
                        "FROM pg_stat_activity WHERE application_name = 'soak-driver' "
                        "ORDER BY random() LIMIT 1) AS s WHERE t"
                    ),
                    once=True,
                )
                self.stats.driver_backends_terminated += n or 0

    async def restart_postgres(self, terminal: int) -> None:
        """Restart PostgreSQL once; then every worker that lived through the outage must
        commit work again by itself (no SIGKILLs or terminations meanwhile, so the workers
        that resume are the ones that saw the server go away)."""
        assert self.pg is not None
        assert self.fleet is not None
        self.holiday = True
        try:
            self.stats.restarts += 1
            self.stats.restart_at_terminal = terminal
            # No kills from now on: let workers still booting come up, so that all of them
            # live through the outage.
            await self.fleet.wait_ready(timeout=30)
            survivors = {w.proc.pid: w for w in self.fleet.live if w.ready()}
            self.stats.restart_survivors = len(survivors)
            self.log(
                f"restarting PostgreSQL ({self.config.restart_mode}) at {terminal} terminal "
                f"runs, under {len(survivors)} running workers"
            )
            t = time.monotonic()
            await asyncio.to_thread(self.pg.restart, self.config.restart_mode)
            self.stats.restart_seconds = time.monotonic() - t
            back = await self.db(lambda c: c.fetchval("SELECT clock_timestamp()"))
            self.log(f"PostgreSQL is back after {self.stats.restart_seconds:.1f} s")
            t = time.monotonic()
            pending = dict(survivors)
            while pending and time.monotonic() - t < RESUME_TIMEOUT:
                await asyncio.sleep(0.2)
                rows = await self.db(
                    lambda c: c.fetch(
                        "SELECT DISTINCT pid FROM effects WHERE at > $1 AND pid = ANY($2::int[])",
                        back,
                        list(pending),
                    )
                )
                for r in rows or ():
                    pending.pop(r["pid"], None)
            self.stats.resume_seconds = time.monotonic() - t
            self.stats.survivors_resumed = len(survivors) - len(pending)
            for w in pending.values():
                self.violations.add(
                    "worker did not resume after the PostgreSQL restart",
                    f"{w.name} (pid {w.proc.pid}, exit {w.proc.poll()}) committed nothing "
                    f"within {RESUME_TIMEOUT:g} s: {w.stderr_tail()!r}",
                )
        finally:
            self.holiday = False
            self._restart_done = True

    async def monitor(self, t0: float) -> None:
        cfg = self.config
        assert cfg.deadline is not None
        last_progress = 0.0
        while True:
            await asyncio.sleep(0.5)
            elapsed = time.monotonic() - t0
            row = await self.db(
                lambda c: c.fetchrow(
                    "SELECT count(*) FILTER (WHERE status <> ALL($1::text[])) AS open, "
                    "count(*) FILTER (WHERE workflow = 'soak' AND status = ANY($1::text[])) "
                    "AS terminal, count(*) FILTER (WHERE workflow = 'soak' AND status = 'failed' "
                    "AND epoch = 0 AND (input ->> 'heal')::boolean) AS to_heal "
                    "FROM durable.runs",
                    list(TERMINAL),
                ),
                once=True,
                timeout=5.0,
            )
            if elapsed - last_progress >= 10:
                last_progress = elapsed
                state = (
                    "db down" if row is None else f"terminal {row['terminal']} open {row['open']}"
                )
                self.log(
                    f"[{elapsed:6.1f} s] started {len(self.run_ids)}/{cfg.runs} {state} "
                    f"kills {self.stats.kills} terminated {self.stats.backends_terminated} "
                    f"restarts {self.stats.restarts}"
                )
            if elapsed > cfg.deadline:
                await self.report_stuck(elapsed)
                return
            if row is None:
                continue
            if self._restart is None and row["terminal"] >= cfg.restart_at * cfg.runs:
                self._restart = asyncio.create_task(self.restart_postgres(row["terminal"]))
            if (
                len(self.run_ids) == cfg.runs
                and row["open"] == 0
                and row["to_heal"] == 0
                and (self._restart is None or self._restart_done)
            ):
                return

    async def report_stuck(self, elapsed: float) -> None:
        rows = await self.db(
            lambda c: c.fetch(
                "SELECT r.workflow, r.status, r.current_node, r.waiting_for, count(*) AS n, "
                "min(r.id) AS example, count(*) FILTER (WHERE EXISTS (SELECT 1 FROM "
                "durable.signals s WHERE s.run_id = r.id AND s.name = r.waiting_for "
                "AND s.consumed_at IS NULL)) AS with_signal_in_mailbox "
                "FROM durable.runs r WHERE r.status <> ALL($1::text[]) GROUP BY 1, 2, 3, 4",
                list(TERMINAL),
            ),
            timeout=30,
        )
        for r in rows or ():
            self.violations.add(
                "stuck runs (not terminal at the deadline)",
                f"{r['n']} {r['workflow']} runs {r['status']} at {r['current_node']} "
                f"(waiting for {r['waiting_for']}, {r['with_signal_in_mailbox']} of them with "
                f"that signal unconsumed in the mailbox), e.g. {r['example']}",
            )
        missing = self.config.runs - len(self.run_ids)
        if missing:
            self.violations.add("runs never started", f"{missing} of {self.config.runs}")
        self.log(f"deadline of {elapsed:.0f} s passed with runs not terminal")

    # -- the end --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Let the workers delete stale jobs (branches of failed parallel nodes...)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            n = await self.db(lambda c: c.fetchval("SELECT count(*) FROM durable.jobs"))
            if n == 0:
                return
            await asyncio.sleep(0.2)

    async def stop_workers(self) -> None:
        assert self.fleet is not None
        self.check_fleet()
        if not await self.fleet.wait_ready():
            self.violations.add(
                "worker never ready",
                "; ".join(
                    f"{w.name}: {w.stderr_tail()!r}" for w in self.fleet.live if not w.ready()
                ),
            )
        codes = await asyncio.to_thread(self.fleet.stop)
        self.stats.stop_codes = codes
        for w, code in zip(self.fleet.live, codes, strict=True):
            if code != 0:
                self.violations.add("graceful stop", f"{w.name} exit {code}: {w.stderr_tail()!r}")

    def count_worker_logs(self) -> None:
        assert self.fleet is not None
        for w in self.fleet.all:
            with contextlib.suppress(FileNotFoundError):
                text = w.err.read_text()
                self.stats.worker_outage_logs += text.count("database unavailable")
                self.stats.worker_recovery_logs += text.count("reachable again")

    async def run(self) -> Report:
        t = time.monotonic()
        cfg = self.config
        workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="durable-soak-"))
        workdir.mkdir(parents=True, exist_ok=True)
        # The driver's own pools log every failed reconnect during the restart: noise here.
        pool_log = logging.getLogger("asyncpg.pool")
        pool_level = pool_log.level
        pool_log.setLevel(logging.CRITICAL)
        try:
            self.dsn = await self.setup(workdir)
            self.log(
                f"soak: {cfg.runs} runs, {cfg.workers} workers x {cfg.concurrency} slots, "
                f"seed {cfg.seed}, deadline {cfg.deadline:.0f} s, logs in {workdir}"
            )
            await self.drive()
            await self.drain()
            await self.stop_workers()
            self.count_worker_logs()
            self.stats.effects_rolled_back = (
                await self.db(
                    lambda c: c.fetchval(
                        "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                        "FROM effects_id_seq) - (SELECT count(*) FROM effects)"
                    )
                )
                or 0
            )
            counts = await self.db(lambda c: check(c, cfg.runs, self.violations), timeout=300)
            assert counts is not None
            for line in await invariant.violations(self.dsn):
                self.violations.add("global invariant", line)
            self.stats.elapsed = time.monotonic() - t
            return Report(self.stats, self.violations, counts, workdir)
        finally:
            await self.teardown()
            pool_log.setLevel(pool_level)


async def soak(config: SoakConfig) -> Report:
    """Run the chaos soak on a PostgreSQL server of its own; return the checker's report."""
    return await Soak(config).run()


# -- the checker ---------------------------------------------------------------------------

#: Journal keys whose compensator runs when the run fails or is cancelled after them.
COMPENSABLE = frozenset({"a", "b", *(f"fan#{b}" for b in app.BRANCHES)})
COMP = "@compensate"
Journal = dict[str, asyncpg.Record]


def _effect_key(key: str) -> bool:
    """Journal keys whose handler writes exactly one `effects` row when it commits."""
    if "@" in key:
        return False
    return key in app.EFFECT_STEPS or key.startswith(("fan#", "lp#")) or key in app.CHILD_STEPS


def _expected_journal(inp: dict[str, Any], journal: dict[str, Any]) -> dict[str, str]:
    """The journal (key -> status) the run's input predicts. For a run doomed in `fan`, the
    branches f0/f1 that committed before f2 failed are taken from the journal itself."""
    done = "completed"
    keys = {k: done for k in ("a", "ext", "nap", "approval", "ping_wait")}
    if inp["doom"] == "fan":
        committed = [f"fan#{b}" for b in ("f0", "f1") if f"fan#{b}" in journal]
        keys.update({k: done for k in committed})
        keys["fan"] = "failed"
        keys.update({f"{k}{COMP}": done for k in ("a", *committed)})
        return keys
    keys.update({f"fan#{b}": done for b in app.BRANCHES})
    keys.update({"fan": done, "pick@route": done, "pick": done, "lp": done})
    keys.update({f"lp#{i}": done for i in range(inp["n"])})
    keys.update({"kid@child": done, "kid": done, "b": done})
    if inp["doom"] == "late":
        keys["doom"] = "failed"
        compensated = ("a", *(f"fan#{b}" for b in app.BRANCHES), "b")
        keys.update({f"{k}{COMP}": done for k in compensated})
    else:
        keys.update({"doom": done, "z": done})
    return keys


def _cancelled_prefix(inp: dict[str, Any], got: set[str]) -> tuple[str | None, str]:
    """(None, the node it stopped in) when `got`, the completed node keys of a cancelled
    run, is what the run can have committed before the cancel took effect: every node up to
    some node, part of that node (some branches, the route's choice, the first iterations,
    the child's start), nothing after it. Otherwise (what is wrong, "")."""
    iterations = [f"lp#{i}" for i in range(inp["n"])]

    def none(s: set[str]) -> bool:
        return not s

    groups: list[tuple[set[str], Callable[[set[str]], bool]]] = [
        *(({k}, none) for k in ("a", "ext", "nap", "approval", "ping_wait")),
        ({f"fan#{b}" for b in app.BRANCHES} | {"fan"}, lambda s: "fan" not in s),
        ({"pick@route", "pick"}, lambda s: s <= {"pick@route"}),
        ({*iterations, "lp"}, lambda s: s == set(iterations[: len(s)])),
        ({"kid@child", "kid"}, lambda s: s <= {"kid@child"}),
        *(({k}, none) for k in ("b", "doom", "z")),
    ]
    cut: str | None = None
    for keys, partial in groups:
        s = got & keys
        if cut is None and s == keys:
            continue
        if cut is not None:
            if s:
                return f"{sorted(s)} committed although {cut} did not", ""
            continue
        if not partial(s):
            return f"{sorted(s)} of {sorted(keys)}", ""
        cut = min(keys - s, key=lambda k: ("#" in k or "@" in k, k))
        cut += " (partly)" if s else ""
    if cut is None:
        return "every node committed", ""
    unknown = got - set().union(*(keys for keys, _ in groups))
    if unknown:
        return f"unknown keys {sorted(unknown)}", ""
    if inp["doom"] == "late" and "doom" in got:
        return "the doomed step committed", ""
    return None, cut


def _completed(j: Journal) -> set[str]:
    return {k for k, r in j.items() if r["status"] == "completed"}


def _check_epoch(
    v: Violations,
    counts: Counter[str],
    rid: str,
    epoch: int,
    j: Journal,
    expected: dict[str, str],
    executed: set[str],
    effects: Counter[str],
    comps: Counter[str],
) -> None:
    """One epoch of a run: its journal `j` as that epoch left it against `expected`; the
    effects and compensator effects written in that epoch against the keys it `executed`
    (committed in it, not replayed); the compensations' order."""
    where = f"{rid} epoch {epoch}"
    got = {k: r["status"] for k, r in j.items()}
    if got != expected:
        extra = {k: s for k, s in got.items() if expected.get(k) != s}
        lacking = {k: s for k, s in expected.items() if got.get(k) != s}
        v.add("journal", f"{where}: extra {extra}, missing {lacking}")

    # Effects: exactly one per key executed in this epoch, none of anything else.
    committed = {k for k in executed if _effect_key(k)}
    for key in committed | set(effects):
        n = effects[key]
        counts["effects"] += n
        if key in committed and n == 0:
            v.add("lost effect", f"{where} {key}")
        elif key in committed and n > 1:
            v.add("duplicated effect", f"{where} {key} x{n}")
        elif key not in committed:
            what = "a replayed" if key in j else "an uncommitted"
            v.add(f"effect of {what} node", f"{where} {key} x{n}")

    # Compensations: exactly once each, in reverse order of completion, after every node.
    undone = {k for k in executed if k.endswith(COMP)}
    for key in undone | set(comps):
        n = comps[key]
        counts["compensator effects"] += n
        if key in undone and n == 0:
            v.add("lost compensation", f"{where} {key}")
        elif key in undone and n > 1:
            v.add("duplicated compensation", f"{where} {key} x{n}")
        elif key not in undone:
            v.add("unexpected compensation", f"{where} {key} x{n}")
    rows = sorted((k for k in j if k.endswith(COMP)), key=lambda k: j[k]["seq"])
    targets = [k.removesuffix(COMP) for k in rows]
    if any(t not in j for t in targets):
        v.add("compensation of an uncommitted node", f"{where}: {rows}")
    elif rows:
        want_order = [f"{k}{COMP}" for k in sorted(targets, key=lambda k: -j[k]["seq"])]
        if rows != want_order:
            v.add("compensation order", f"{where}: {rows}, expected {want_order}")
        first = j[rows[0]]["seq"]
        late = [k for k in _completed(j) if not k.endswith(COMP) and j[k]["seq"] > first]
        if late:
            v.add("node committed after compensation began", f"{where}: {sorted(late)}")


def _want_failed(inp: dict[str, Any], j: Journal, executed: set[str]) -> Counter[str]:
    """The failed attempts (outside `ext` and compensators) of one epoch: the flaky step's
    first attempt and the doomed node's one (a kill, a terminated connection or the restart
    rolls an attempt back unrecorded)."""
    want: Counter[str] = Counter()
    if inp["flaky"] and "b" in executed:
        want["b"] = 1
    if "doom" in j and j["doom"]["status"] == "failed":
        want["doom"] = 1
    if "fan" in j and j["fan"]["status"] == "failed":
        want["fan#f2"] = 1
    return want


@dataclass
class Data:
    """What the checker read from the database, by run."""

    journal: dict[str, Journal]
    before_retry: dict[str, Journal]
    attempts: dict[str, dict[int, Counter[str]]]
    effects: dict[str, dict[int, Counter[str]]]
    effect_info: dict[tuple[str, str], set[str | None]]
    comps: dict[str, dict[int, Counter[str]]]
    ext: dict[str, Counter[str]]
    mailbox: dict[tuple[str, str], list[asyncpg.Record]]
    sent: dict[tuple[str, str], list[asyncpg.Record]]
    cancels: dict[str, list[asyncpg.Record]]
    retries: dict[str, list[asyncpg.Record]]
    #: Attempts failed because workers died holding the job `max_claims` times in a row:
    #: the engine's bounded failure, which the chaos may trip on any node (runs go on).
    died: int = 0


def _by_epoch() -> defaultdict[str, defaultdict[int, Counter[str]]]:
    return defaultdict(lambda: defaultdict(Counter))


async def _read(conn: asyncpg.Connection) -> Data:
    journal: dict[str, Journal] = defaultdict(dict)
    for r in await conn.fetch(
        "SELECT run_id, key, status, result::text AS result, attempts, started_at, "
        "finished_at, seq FROM durable.journal ORDER BY seq"
    ):
        journal[r["run_id"]][r["key"]] = r
    before_retry: dict[str, Journal] = defaultdict(dict)
    for r in await conn.fetch(
        "SELECT run_id, key, status, result::text AS result, finished_at, seq "
        "FROM journal_before_retry ORDER BY seq"
    ):
        before_retry[r["run_id"]][r["key"]] = r
    attempts = _by_epoch()
    died = 0
    for r in await conn.fetch("SELECT run_id, key, epoch, error FROM durable.attempts"):
        if r["error"].startswith("WorkerLost: workers died"):
            died += 1
            continue
        attempts[r["run_id"]][r["epoch"]][r["key"]] += 1
    effects = _by_epoch()
    effect_info: dict[tuple[str, str], set[str | None]] = defaultdict(set)
    for r in await conn.fetch("SELECT run_id, key, epoch, info FROM effects"):
        effects[r["run_id"]][r["epoch"]][r["key"]] += 1
        effect_info[(r["run_id"], r["key"])].add(r["info"])
    comps = _by_epoch()
    for r in await conn.fetch("SELECT run_id, key, epoch FROM comp_effects"):
        comps[r["run_id"]][r["epoch"]][r["key"]] += 1
    ext: dict[str, Counter[str]] = defaultdict(Counter)
    for r in await conn.fetch("SELECT run_id, token FROM ext_effects"):
        ext[r["run_id"]][r["token"]] += 1
    mailbox: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for r in await conn.fetch(
        "SELECT id, run_id, name, payload::text AS payload, consumed_by, consumed_at "
        "FROM durable.signals ORDER BY id"
    ):
        mailbox[(r["run_id"], r["name"])].append(r)
    sent: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for r in await conn.fetch(
        "SELECT run_id, name, payload::text AS payload, accepted, sent_at FROM sent_signals"
    ):
        sent[(r["run_id"], r["name"])].append(r)
    cancels: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await conn.fetch("SELECT * FROM sent_cancels ORDER BY id"):
        cancels[r["run_id"]].append(r)
    retries: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await conn.fetch("SELECT * FROM sent_retries ORDER BY id"):
        retries[r["run_id"]].append(r)
    return Data(
        journal,
        before_retry,
        attempts,
        effects,
        effect_info,
        comps,
        ext,
        mailbox,
        sent,
        cancels,
        retries,
        died,
    )


async def check(conn: asyncpg.Connection, expected_runs: int, v: Violations) -> dict[str, int]:
    """Check the soak's database; add violations to `v`, return what was counted."""
    counts: Counter[str] = Counter()
    runs = await conn.fetch(
        "SELECT id, workflow, status, input::text AS input, result::text AS result, error, "
        "parent_id, parent_node, idempotency_key, finished_at, epoch FROM durable.runs"
    )
    d = await _read(conn)
    counts["attempts failed by workers dying in a row (max_claims)"] = d.died

    by_id = {r["id"]: r for r in runs}
    parents = [r for r in runs if r["workflow"] == "soak"]
    children: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in runs:
        if r["workflow"] == "soak_child":
            children[r["parent_id"]].append(r)
        elif r["workflow"] != "soak":
            v.add("unknown runs", f"{r['id']} of workflow {r['workflow']}")

    # Runs: all there, all terminal.
    keys = Counter(r["idempotency_key"] for r in parents)
    want = {f"soak-{i}" for i in range(expected_runs)}
    if set(keys) != want or any(n != 1 for n in keys.values()):
        v.add(
            "parent runs",
            f"{len(parents)} parent runs for {expected_runs} starts; missing "
            f"{sorted(want - set(keys))[:5]}, unexpected {sorted(set(keys) - want)[:5]}",
        )
    for r in runs:
        if r["status"] not in TERMINAL:
            v.add("stuck runs", f"{r['workflow']} {r['id']} is {r['status']}")

    for p in parents:
        _check_parent(v, counts, p, d, children.pop(p["id"], []))

    for parent_id, kids in children.items():
        for kid in kids:
            v.add("orphan child", f"{kid['id']} of {parent_id} ({by_id.get(parent_id)})")

    # Signals to runs the driver never addressed, or addressed to no run.
    addressed = {k[0] for k in d.sent}
    for (rid, name), rows in d.mailbox.items():
        if rid not in addressed:
            v.add("phantom signal", f"{len(rows)} {name} signals in the mailbox of {rid}")

    jobs = await conn.fetchval("SELECT count(*) FROM durable.jobs")
    leases = await conn.fetchval("SELECT count(*) FROM durable.jobs WHERE lease_token IS NOT NULL")
    if jobs:
        sample = await conn.fetch(
            "SELECT id, task, branch, run_id, payload::text FROM durable.jobs LIMIT 5"
        )
        v.add("jobs left", f"{jobs} job rows, e.g. {[tuple(r) for r in sample]}")
    if leases:
        v.add("leases left", f"{leases} jobs still leased")
    cancels = await conn.fetchval("SELECT count(*) FROM durable.cancel_requests")
    if cancels:
        v.add("cancel requests left", f"{cancels}")
    counts["runs"] = len(runs)
    counts["jobs left"] = jobs
    return dict(counts)


def _check_parent(
    v: Violations, counts: Counter[str], p: asyncpg.Record, d: Data, kids: list[asyncpg.Record]
) -> None:
    rid = p["id"]
    inp = json.loads(p["input"])
    j = d.journal[rid]
    cancels = d.cancels[rid]
    status = p["status"]

    # The final status: the input's fate, unless a cancel took effect first.
    fate = "failed" if inp["doom"] and not inp["heal"] else "completed"
    outcomes = {c["accepted"] for c in cancels}
    allowed = (
        {"cancelled"} if True in outcomes else {fate, "cancelled"} if None in outcomes else {fate}
    )
    counts[f"parents {status}"] += 1
    if status not in allowed:
        v.add(
            "wrong final status",
            f"{rid} (doom={inp['doom']!r}, heal={inp['heal']}, cancels "
            f"{[c['accepted'] for c in cancels]}) is {status}, expected {sorted(allowed)}: "
            f"{p['error']}",
        )
        return
    if cancels and not inp["cancel"]:
        v.add("driver", f"{rid} was cancelled but its input does not say so")
    if status == "failed" and "doomed by the input" not in (p["error"] or ""):
        v.add("wrong error", f"{rid}: {p['error']!r}")
    if status == "cancelled" and not (p["error"] or "").startswith("soak cancel"):
        v.add("wrong error", f"{rid} (cancelled): {p['error']!r}")
    retried = status == "completed" and bool(inp["heal"])
    if p["epoch"] != int(retried):
        v.add("epoch", f"{rid} ({status}, heal={inp['heal']}) is in epoch {p['epoch']}")
        return
    if not retried and d.retries[rid]:
        v.add("driver", f"{rid} was retried but should not have been")

    # The journal of each epoch, and what ran in it.
    epochs: list[tuple[Journal, dict[str, str], set[str]]] = []
    if retried:
        counts["parents retried"] += 1
        accepted = [r["accepted"] for r in d.retries[rid]]
        if accepted.count(True) > 1 or accepted.count(False):
            v.add("retry", f"{rid}: retry calls returned {accepted}")
        j0 = d.before_retry.get(rid)
        if not j0:
            v.add("retry", f"{rid} is in epoch 1 without a journal copy from before its retry")
            return
        epochs.append((j0, _expected_journal(inp, j0), _completed(j0)))
        # Re-run: the failed node and every step whose compensator ran; the rest replays
        # (keeps its journal row). A parallel node re-runs with its undone branches.
        executed = {k for k in _completed(j) if k not in j0 or j0[k]["seq"] != j[k]["seq"]}
        kept = {k for k in _completed(j0) if f"{k}{COMP}" not in j0 and not k.endswith(COMP)}
        must = {k for k in _completed(j) if not k.endswith(COMP)} - kept
        if any(k.startswith("fan#") for k in must):
            # The parallel node itself may be journaled again or kept: either is right.
            must.discard("fan")
            executed.discard("fan")
        if executed != must:
            v.add(
                "retry re-ran the wrong nodes",
                f"{rid}: re-ran {sorted(executed - must)} needlessly, replayed "
                f"{sorted(must - executed)}",
            )
        epochs.append((j, _expected_journal({**inp, "doom": ""}, j), executed))
    elif status == "cancelled":
        got = {k for k in _completed(j) if not k.endswith(COMP)}
        wrong, cut = _cancelled_prefix(inp, got)
        if wrong is not None:
            v.add("cancelled run's journal is no prefix", f"{rid}: {wrong}")
        else:
            counts[f"cancelled in {cut}"] += 1
        expected = dict.fromkeys(got, "completed")
        expected.update({f"{k}{COMP}": "completed" for k in got & COMPENSABLE})
        epochs.append((j, expected, _completed(j)))
        # Nothing ran after the cancel: every node committed before the (first accepted)
        # cancel returned.
        returned = [c["returned_at"] for c in cancels if c["accepted"] is True]
        if returned:
            late = sorted(k for k in got if j[k]["finished_at"] > min(returned))
            if late:
                v.add("node committed after the cancel returned", f"{rid}: {late}")
    else:
        epochs.append((j, _expected_journal(inp, j), _completed(j)))

    for epoch, (je, expected, executed) in enumerate(epochs):
        _check_epoch(
            v,
            counts,
            rid,
            epoch,
            je,
            expected,
            executed,
            d.effects[rid][epoch],
            d.comps[rid][epoch],
        )
        failed = Counter(
            {k: n for k, n in d.attempts[rid][epoch].items() if k != "ext" and "@" not in k}
        )
        want_failed = _want_failed(inp, je, executed)
        if status == "cancelled" and inp["flaky"] and "b" not in je and failed["b"] <= 1:
            failed.pop("b", None)  # its first attempt may have failed before the cancel
        if failed != want_failed:
            v.add(
                "unexpected failed attempts",
                f"{rid} epoch {epoch}: {dict(failed)}, expected {dict(want_failed)}",
            )
        counts["flaky retries"] += d.attempts[rid][epoch]["b"]
        counts["ext attempts lost with a worker"] += d.attempts[rid][epoch]["ext"]
    for table, by_epoch in (
        ("attempts", d.attempts),
        ("effects", d.effects),
        ("comp_effects", d.comps),
    ):
        beyond = {e: dict(c) for e, c in by_epoch[rid].items() if e >= len(epochs) and c}
        if beyond:
            v.add("rows of an epoch the run never had", f"{rid} {table}: {beyond}")

    if "pick" in j:
        route = j["pick@route"]["result"] if "pick@route" in j else None
        if route is None or json.loads(route) != inp["route"]:
            v.add("route", f"{rid} chose {route}, input says {inp['route']!r}")
        if d.effect_info[(rid, "pick")] != {inp["route"]}:
            v.add("route", f"{rid} ran branch {d.effect_info[(rid, 'pick')]}")

    # The non-transactional step: at least once, and its committed attempt's effect.
    if "ext" in j:
        token = json.loads(j["ext"]["result"])["token"]
        if d.ext[rid][token] != 1:
            v.add(
                "ext effect",
                f"{rid}: the committed attempt's token is in ext_effects {d.ext[rid][token]} times",
            )
        counts["ext re-executions (at-least-once)"] += sum(d.ext[rid].values()) - 1

    # The sleep never woke early (its wake time is computed after `ext` committed).
    if "nap" in j and "ext" in j:
        slept = j["nap"]["finished_at"] - j["ext"]["finished_at"]
        if slept < timedelta(seconds=inp["nap"]):
            v.add("sleep woke early", f"{rid}: {slept.total_seconds():.3f} s < {inp['nap']}")

    # Signals. A run refuses them from when it first ended, failed or was cancelled.
    ends = [r["finished_at"] for je, _, _ in epochs for r in je.values() if r["status"] == "failed"]
    ends += [c["called_at"] for c in cancels]
    if status == "completed":
        ends.append(p["finished_at"])
    ended = min(ends, default=None)
    for name, node in app.WAIT_NODES.items():
        _check_signals(
            v, counts, rid, ended, name, node, j, d.mailbox[(rid, name)], d.sent[(rid, name)]
        )
    if "ping_wait" in j and json.loads(j["ping_wait"]["result"]) == app.PING_DEFAULT:
        counts["ping waits timed out"] += 1
        if j["ping_wait"]["finished_at"] - j["approval"]["finished_at"] < timedelta(
            seconds=app.PING_TIMEOUT
        ):
            v.add("signal wait timed out early", rid)

    # Exactly one child per child node started, and its result is the node's.
    if "kid@child" not in j:
        if kids:
            v.add("child", f"{rid} never started 'kid' but has children {kids}")
    elif len(kids) != 1:
        v.add("child", f"{rid} has {len(kids)} children")
    else:
        kid = kids[0]
        marker = json.loads(j["kid@child"]["result"])
        if marker != {"run_id": kid["id"]} or kid["parent_node"] != "kid":
            v.add("child", f"{rid}: marker {marker} for child {kid['id']}")
        # A child still running when its parent is cancelled is cancelled with it.
        may_cancel = status == "cancelled" and "kid" not in j
        if kid["status"] != "completed" and not (may_cancel and kid["status"] == "cancelled"):
            v.add("child", f"child {kid['id']} is {kid['status']} (parent {status})")
        elif "kid" in j and json.loads(j["kid"]["result"]) != json.loads(kid["result"]):
            v.add("child", f"{rid}: 'kid' result differs from child {kid['id']}'s")
        _check_child(v, counts, kid, d.journal[kid["id"]], d)

    if status == "completed":
        names = {n.name for n in app.soak.nodes}
        if set(json.loads(p["result"] or "{}")) != names:
            v.add("run result", f"{rid}: {p['result']}")


def _check_child(
    v: Violations, counts: Counter[str], kid: asyncpg.Record, j: Journal, d: Data
) -> None:
    counts[f"children {kid['status']}"] += 1
    kid_id = kid["id"]
    got = {k: r["status"] for k, r in j.items()}
    steps = list(app.CHILD_STEPS)
    if kid["status"] == "completed":
        ok = got == dict.fromkeys(steps, "completed")
    else:  # cancelled with its parent: the first steps
        ok = got == dict.fromkeys(steps[: len(got)], "completed") and len(got) < len(steps)
        if "was cancelled" not in (kid["error"] or ""):
            v.add("wrong error", f"child {kid_id} (cancelled): {kid['error']!r}")
    if not ok:
        v.add("journal", f"child {kid_id} ({kid['status']}): {got}")
    effects = d.effects[kid_id]
    for key in set(got) | set(effects[0]):
        n = effects[0][key]
        counts["effects"] += n
        if key not in got:
            v.add("effect of an uncommitted node", f"child {kid_id} {key} x{n}")
        elif n == 0:
            v.add("lost effect", f"child {kid_id} {key}")
        elif n > 1:
            v.add("duplicated effect", f"child {kid_id} {key} x{n}")
    if any(e != 0 and c for e, c in effects.items()):
        v.add("rows of an epoch the run never had", f"child {kid_id}: {dict(effects)}")
    if any(d.comps[kid_id].values()):
        v.add("unexpected compensation", f"child {kid_id}: {dict(d.comps[kid_id])}")
    if any(d.attempts[kid_id].values()):
        v.add("unexpected failed attempts", f"child {kid_id}: {dict(d.attempts[kid_id])}")


def _check_signals(
    v: Violations,
    counts: Counter[str],
    rid: str,
    ended: Any,
    name: str,
    node: str,
    j: Journal,
    box: list[asyncpg.Record],
    sent: list[asyncpg.Record],
) -> None:
    """One run's signals of one name against what the driver sent and what its wait did;
    `ended`: from when on the run may refuse signals (it finished, failed or was cancelled)."""
    by_payload = {json.loads(s["payload"])["seq"]: s for s in sent}
    n_true = sum(1 for s in sent if s["accepted"] is True)
    n_unknown = sum(1 for s in sent if s["accepted"] is None)
    counts[f"{name} signals sent"] += len(sent)
    if not n_true <= len(box) <= n_true + n_unknown:
        v.add(
            "mailbox count",
            f"{rid} {name}: {len(box)} in the mailbox, {n_true} accepted + {n_unknown} unknown",
        )
    seqs = [json.loads(m["payload"])["seq"] for m in box]
    if len(set(seqs)) != len(seqs) or any(s not in by_payload for s in seqs):
        v.add("phantom or doubled signal", f"{rid} {name}: mailbox seqs {seqs}")
    for s in sent:
        if s["accepted"] is True and json.loads(s["payload"])["seq"] not in seqs:
            v.add("lost signal (accepted, not in the mailbox)", f"{rid} {name} {s['payload']}")
        # Only a finished or compensating run refuses a signal.
        if s["accepted"] is False and (ended is None or ended >= s["sent_at"]):
            v.add("signal refused by an active run", f"{rid} {name} sent {s['sent_at']}")

    consumed = [m for m in box if m["consumed_at"] is not None]
    counts[f"{name} signals consumed"] += len(consumed)
    for m in consumed:
        if m["consumed_by"] != node:
            v.add("consumed by the wrong node", f"{rid} {name} by {m['consumed_by']!r}")
    if len(consumed) > 1:
        v.add("signal consumed twice", f"{rid} {name}: {len(consumed)} consumed by one wait")
    wait = j.get(node)
    if consumed and box[0]["consumed_at"] is None:
        v.add("signals consumed out of order", f"{rid} {name}: {[m['id'] for m in box]}")
    if wait is None:
        if consumed:
            v.add("consumed without a journaled wait", f"{rid} {name}")
        counts[f"{name} left unconsumed (run never reached the wait)"] += len(box)
        return
    result = json.loads(wait["result"])
    if consumed:
        if result != json.loads(consumed[0]["payload"]):
            v.add("wait result is not the consumed payload", f"{rid} {node}: {result}")
        counts[f"{name} left unconsumed (after the wait consumed one)"] += len(box) - 1
        return
    if result != app.PING_DEFAULT or name != "ping":
        v.add("wait completed without consuming a signal", f"{rid} {node}: {result}")
    for m in box:
        s = by_payload.get(json.loads(m["payload"])["seq"])
        # Committed before the wait's last visit began: that visit had to consume it.
        if s is not None and s["sent_at"] < wait["started_at"]:
            v.add(
                "lost signal (the wait timed out although it was in the mailbox)",
                f"{rid} {name} sent {s['sent_at']}, wait visited {wait['started_at']}",
            )
        else:
            counts[f"{name} left unconsumed (arrived after the timeout)"] += 1


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=None, help="seconds (default scaled)")
    parser.add_argument("--ramp", type=float, default=None, help="seconds to start all runs")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--restart-mode", choices=("fast", "immediate"), default="immediate")
    parser.add_argument("--workdir", type=Path, default=None, help="where worker logs go")
    parser.add_argument("--keep", action="store_true", help="keep the server's data directory")
    parser.add_argument("--quiet", action="store_true")
    a = parser.parse_args(argv)
    return SoakConfig(
        runs=a.runs,
        workers=a.workers,
        concurrency=a.concurrency,
        deadline=a.deadline,
        ramp=a.ramp,
        seed=a.seed,
        restart_mode=a.restart_mode,
        workdir=a.workdir,
        keep=a.keep,
        progress=not a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    report = asyncio.run(soak(parse_args(argv)))
    print(report.render(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
