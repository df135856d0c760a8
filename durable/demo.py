"""`durable demo`: an order saga on a real PostgreSQL, with retries and compensation.

The `order` workflow has three steps, each writing its own table through `ctx.conn`, so a
step's writes commit in the same transaction as its journal entry:

    reserve  -> demo_inventory   (compensated by release: the reservation is released)
    charge   -> demo_payments    (compensated by refund: the payment is refunded)
    ship     -> demo_shipments

`ship` talks to a pretend carrier that times out on the first attempt of every order, so
every order shows a retry. Two orders can never ship: one address the carrier rejects
(`NonRetryable`, fails at once), one it never serves (fails on every attempt until the
retry budget is spent). Those runs walk their compensations in reverse (refund, then
release) and end `failed`. The demo starts six orders, runs a worker, prints each status
change as it happens, then each run's journal as a timeline and a summary that checks the
business tables: shipped orders are reserved, charged and shipped; failed orders are
released, refunded and not shipped.

With `DURABLE_DSN` (or `dsn=`) unset, a throwaway PostgreSQL server is started for the
demo and removed afterwards (`durable.server.provision`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import anyio

from durable.cli import timeline_lines
from durable.context import Context
from durable.db import Connection, redact
from durable.engine import Engine
from durable.errors import NonRetryable
from durable.model import Run, RunStatus
from durable.workflow import Workflow

__all__ = ["ORDERS", "build_workflow", "run_demo"]

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS demo_inventory (
    run_id text PRIMARY KEY,
    order_no text NOT NULL,
    sku text NOT NULL,
    qty integer NOT NULL,
    status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS demo_payments (
    run_id text PRIMARY KEY,
    order_no text NOT NULL,
    amount_cents integer NOT NULL,
    status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS demo_shipments (
    run_id text PRIMARY KEY,
    order_no text NOT NULL,
    address text NOT NULL,
    tracking text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

#: Addresses the pretend carrier can never deliver to, and how it says no.
REJECTED_ADDRESS = "1 Atlantis Way, Atlantis"  # NonRetryable: fails at once
UNSERVED_ADDRESS = "North Pole"  # a plain error on every attempt: the retries run out

ORDERS: tuple[dict[str, Any], ...] = (
    {"order": "A-1001", "sku": "KEYBOARD", "qty": 1, "amount_cents": 4900,
     "address": "12 Main St, Springfield"},
    {"order": "A-1002", "sku": "MOUSE", "qty": 2, "amount_cents": 3800,
     "address": "7 Elm Rd, Shelbyville"},
    {"order": "A-1003", "sku": "MONITOR", "qty": 1, "amount_cents": 21900,
     "address": REJECTED_ADDRESS},
    {"order": "A-1004", "sku": "CABLE", "qty": 3, "amount_cents": 1500,
     "address": "3 Oak Ave, Capital City"},
    {"order": "A-1005", "sku": "DOCK", "qty": 1, "amount_cents": 12900,
     "address": UNSERVED_ADDRESS},
    {"order": "A-1006", "sku": "WEBCAM", "qty": 1, "amount_cents": 6900,
     "address": "99 Pine St, Ogdenville"},
)  # fmt: skip

DOOMED = frozenset(
    o["order"] for o in ORDERS if o["address"] in (REJECTED_ADDRESS, UNSERVED_ADDRESS)
)

BACKOFF_SECONDS = 0.2
MAX_ATTEMPTS = 3
POLL_SECONDS = 0.1
DEADLINE_SECONDS = 60.0


class CarrierError(Exception):
    """The pretend carrier's API failed (a retryable error)."""


def _conn(ctx: Context) -> Connection:
    assert ctx.conn is not None, "demo steps are transactional"
    return ctx.conn


async def reserve(ctx: Context) -> dict[str, Any]:
    """Reserve stock for the order."""
    o = ctx.input
    await _conn(ctx).execute(
        "INSERT INTO demo_inventory (run_id, order_no, sku, qty, status) "
        "VALUES ($1, $2, $3, $4, 'reserved')",
        ctx.run_id,
        o["order"],
        o["sku"],
        o["qty"],
    )
    return {"reserved": o["qty"], "sku": o["sku"]}


async def release(ctx: Context) -> dict[str, Any]:
    """Compensation of `reserve`: give the stock back."""
    await _conn(ctx).execute(
        "UPDATE demo_inventory SET status = 'released', updated_at = clock_timestamp() "
        "WHERE run_id = $1",
        ctx.run_id,
    )
    return {"released": ctx.input["qty"]}


async def charge(ctx: Context) -> dict[str, Any]:
    """Charge the customer."""
    o = ctx.input
    await _conn(ctx).execute(
        "INSERT INTO demo_payments (run_id, order_no, amount_cents, status) "
        "VALUES ($1, $2, $3, 'charged')",
        ctx.run_id,
        o["order"],
        o["amount_cents"],
    )
    return {"charged_cents": o["amount_cents"]}


async def refund(ctx: Context) -> dict[str, Any]:
    """Compensation of `charge`: refund the payment."""
    await _conn(ctx).execute(
        "UPDATE demo_payments SET status = 'refunded', updated_at = clock_timestamp() "
        "WHERE run_id = $1",
        ctx.run_id,
    )
    return {"refunded_cents": ctx.input["amount_cents"]}


async def ship(ctx: Context) -> dict[str, Any]:
    """Book the shipment with the carrier; the carrier is flaky and picky."""
    address = ctx.input["address"]
    if ctx.attempt == 1:
        raise CarrierError("carrier API timed out")
    if address == REJECTED_ADDRESS:
        raise NonRetryable(f"carrier rejects the address {address!r}")
    if address == UNSERVED_ADDRESS:
        raise CarrierError(f"no carrier serves {address!r}")
    tracking = f"TRK-{ctx.input['order']}-{ctx.run_id[-6:]}"
    await _conn(ctx).execute(
        "INSERT INTO demo_shipments (run_id, order_no, address, tracking) VALUES ($1, $2, $3, $4)",
        ctx.run_id,
        ctx.input["order"],
        address,
        tracking,
    )
    return {"tracking": tracking}


def build_workflow() -> Workflow:
    """The demo's `order` workflow: reserve -> charge -> ship, with compensations."""
    wf = Workflow("order")
    opts: dict[str, Any] = {"max_attempts": MAX_ATTEMPTS, "backoff": BACKOFF_SECONDS}
    wf.step("reserve", reserve, compensate=release, **opts)
    wf.step("charge", charge, compensate=refund, **opts)
    wf.step("ship", ship, **opts)
    return wf


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Without any logging set-up, Python prints durable's retry warnings to stderr; the demo
    shows them in its own output instead, so mute them unless logging is configured."""
    logger = logging.getLogger("durable")
    if logging.getLogger().handlers or logger.handlers:
        yield
        return
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()

    def __call__(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


async def run_demo(
    dsn: str | None = None, out: TextIO = sys.stdout, *, schema: str = "durable"
) -> int:
    """Run the order-saga demo and print its progress, timelines and summary to `out`.

    `dsn`: the database to use; when None, `$DURABLE_DSN`, else a throwaway server started
    for the demo. Returns the exit code: 0 when every run ended as the demo expects.
    """
    say = _Printer(out)
    say("durable demo: an order saga (reserve -> charge -> ship) with retries and compensation")
    throwaway = dsn is None and not os.environ.get("DURABLE_DSN")
    with contextlib.ExitStack() as stack:
        if dsn is None:
            from durable.server import provision

            say("starting a throwaway PostgreSQL (set DURABLE_DSN to use your own) ...")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. platformdirs' XDG_RUNTIME_DIR notice
                dsn = stack.enter_context(provision())
            say(f"PostgreSQL ready at {redact(dsn)} in {say.elapsed():.1f} s")
        else:
            say(f"database: {redact(dsn)}")
        stack.enter_context(_quiet_library_logs())
        code = await _demo(dsn, schema, say)
        if throwaway:
            say("the throwaway server is removed now; set DURABLE_DSN to keep the runs.")
        else:
            say(
                "the runs stay in the database: try 'durable runs list --workflow order' and "
                "'durable runs show ID'."
            )
        return code
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: ExitStack may swallow)


async def _demo(dsn: str, schema: str, say: _Printer) -> int:
    engine = Engine(dsn, workflows=[build_workflow()], schema=schema)
    async with engine:
        async with engine.pool.acquire() as conn:
            await conn.execute(TABLES_SQL)
        say(
            f"ship fails on the first attempt of every order (carrier timeout, retried with a "
            f"{BACKOFF_SECONDS:g} s backoff) and for good on {len(DOOMED)} orders "
            f"({', '.join(sorted(DOOMED))}), which refunds and releases them."
        )
        say()
        started = say.elapsed()
        async with engine.worker(concurrency=4):
            ids: dict[str, str] = {}
            for order in ORDERS:
                ids[await engine.start("order", order)] = order["order"]
            say(f"started {len(ids)} orders; progress (a line per change):")
            finals = await _watch(engine, ids, say)
        took = say.elapsed() - started
        if finals is None:
            say(f"runs did not finish within {DEADLINE_SECONDS:.0f} s; is the worker stuck?")
            return 1
        say()
        say("timelines (offset from start, journal key, outcome, attempt, duration, error):")
        for run_id, order_no in ids.items():
            run = await engine.get_run(run_id, journal=True)
            say()
            say(f"order {order_no}  run {run.id}  {run.status.value}")
            for line in timeline_lines(run, indent="    "):
                say(line)
        return await _summary(engine, ids, finals, took, say)


async def _watch(engine: Engine, ids: dict[str, str], say: _Printer) -> dict[str, Run] | None:
    """Poll the runs, print each status or node change, return the final runs."""
    seen: dict[str, tuple[RunStatus, str | None]] = {}
    finals: dict[str, Run] = {}
    with anyio.move_on_after(DEADLINE_SECONDS):
        while len(finals) < len(ids):
            for run_id, order_no in ids.items():
                if run_id in finals:
                    continue
                run = await engine.get_run(run_id)
                state = (run.status, run.current_node)
                if seen.get(run_id) != state:
                    seen[run_id] = state
                    where = f"at {run.current_node}" if run.current_node else ""
                    note = f"  ({run.error})" if run.error and run.status.terminal else ""
                    say(
                        f"  {say.elapsed():6.2f} s  {order_no}  "
                        f"{run.status.value:<12} {where}{note}".rstrip()
                    )
                if run.status.terminal:
                    finals[run_id] = run
            if len(finals) < len(ids):
                await anyio.sleep(POLL_SECONDS)
        return finals
    return None


async def _summary(
    engine: Engine, ids: dict[str, str], finals: dict[str, Run], took: float, say: _Printer
) -> int:
    counts = {s: sum(1 for r in finals.values() if r.status is s) for s in RunStatus}
    say()
    say(
        f"summary: {len(ids)} orders in {took:.1f} s: {counts[RunStatus.COMPLETED]} completed, "
        f"{counts[RunStatus.FAILED]} failed"
    )
    async with engine.pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT r.id, i.status AS inventory, p.status AS payment, s.tracking
            FROM unnest($1::text[]) AS r(id)
            LEFT JOIN demo_inventory i ON i.run_id = r.id
            LEFT JOIN demo_payments p ON p.run_id = r.id
            LEFT JOIN demo_shipments s ON s.run_id = r.id
            """,
            list(ids),
        )
    ok = True
    for row in sorted(rows, key=lambda r: ids[r["id"]]):
        order_no = ids[row["id"]]
        run = finals[row["id"]]
        doomed = order_no in DOOMED
        expected_status = RunStatus.FAILED if doomed else RunStatus.COMPLETED
        if doomed:
            good = (row["inventory"], row["payment"], row["tracking"]) == (
                "released",
                "refunded",
                None,
            )
            story = "compensated: payment refunded, stock released, nothing shipped"
        else:
            good = (row["inventory"], row["payment"]) == ("reserved", "charged") and bool(
                row["tracking"]
            )
            story = f"shipped: stock reserved, payment charged, tracking {row['tracking']}"
        good = good and run.status is expected_status
        ok = ok and good
        tables = (
            f"inventory={row['inventory']} payment={row['payment']} "
            f"shipment={row['tracking'] or '-'}"
        )
        say(f"  {order_no}  {run.status.value:<9}  {story if good else 'UNEXPECTED: ' + tables}")
    doomed_ok = all(finals[rid].status is RunStatus.FAILED for rid, o in ids.items() if o in DOOMED)
    if ok and doomed_ok:
        say(
            f"all as expected: {len(DOOMED)} doomed orders were compensated "
            "(inventory released, payments refunded), the others shipped."
        )
        say("every step's writes committed atomically with its journal entry (ctx.conn).")
        return 0
    say("something did not end as expected (see above)")
    return 1
