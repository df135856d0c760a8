"""Run every benchmark scenario and the raw asyncpg baseline in one process and print a table.

    python -m benchmarks.run [--quick] [--only chain,fan-out,...] [--scale-rows N]
                               [--scale-months M] [--json PATH]

The database comes from `DURABLE_DSN` when set, else a throwaway local PostgreSQL
(`durable.server`, `fsync` and `synchronous_commit` on). Every scenario gets a fresh
database, migrated by `Engine.open()`. Progress goes to stderr; the report to stdout; the
table also to `benchmarks/results/latest.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from benchmarks import baseline, dashboard, facts, rival, scenarios
from benchmarks.common import FULL, QUICK, Sizes, fmt_int, fresh_database, progress
from durable.cli import run_async
from durable.server import provision

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

SCENARIOS: dict[str, Callable[[str, Sizes], Awaitable[dict[str, Any]]]] = {
    "chain": scenarios.chain,
    "loop": scenarios.loop,
    "fan-out": scenarios.fanout,
    "fan-out-keyed": scenarios.fanout_keyed,
    "fan-out-limited": scenarios.fanout_limited,
    "fan-out-limited-1": scenarios.fanout_limited_one,
    "drain": scenarios.drain,
    "drain-vs-pgqueuer": rival.drain_vs_pgqueuer,
    "start": scenarios.start,
    "latency": scenarios.latency,
    "scale": scenarios.scale,
    "memory": scenarios.memory,
    "dashboard": lambda dsn, sizes: dashboard.measure(
        dsn, dashboard.RUNS if sizes.name == "full" else dashboard.RUNS // 5
    ),
}


@dataclass
class Row:
    scenario: str
    figure: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def met_text(self) -> str:
        return "-" if self.met is None else ("yes" if self.met else "no")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "error: " + (text if len(text) <= 70 else text[:67] + "...")


async def _measure(
    server_dsn: str,
    name: str,
    fn: Callable[[str, Sizes], Awaitable[dict[str, Any]]],
    sizes: Sizes,
) -> dict[str, Any] | BaseException:
    progress(f"--- {name} ---")
    t0 = time.perf_counter()
    try:
        with anyio.fail_after(sizes.scenario_timeout + 60):
            async with fresh_database(server_dsn, name) as dsn:
                result = await fn(dsn, sizes)
    except Exception as exc:
        progress(f"{name} FAILED: {exc!r}")
        logging.getLogger("benchmarks").debug("scenario %s failed", name, exc_info=exc)
        return exc
    result["wall_seconds"] = time.perf_counter() - t0
    return result


async def _baselines(server_dsn: str, sizes: Sizes) -> dict[str, dict[str, Any] | BaseException]:
    """baseline-1 and baseline-8, each the median of `repeats` rounds (interleaved)."""
    out: dict[str, dict[str, Any] | BaseException] = {}
    progress("--- baseline ---")
    rounds: dict[str, list[dict[str, Any]]] = {"baseline-1": [], "baseline-8": []}
    try:
        async with fresh_database(server_dsn, "baseline") as dsn:
            for _ in range(sizes.repeats):
                for name, conns, total in (
                    ("baseline-1", 1, sizes.baseline_tx_1),
                    ("baseline-8", 8, sizes.baseline_tx_8),
                ):
                    rounds[name].append(
                        await baseline.measure(dsn, connections=conns, transactions=total)
                    )
    except Exception as exc:
        progress(f"baseline FAILED: {exc!r}")
        return {"baseline-1": exc, "baseline-8": exc}
    for name, found in rounds.items():
        ordered = sorted(found, key=lambda r: float(r["value"]))
        out[name] = {**ordered[len(ordered) // 2], "samples": [r["value"] for r in found]}
    return out


def _rate_row(
    name: str,
    result: dict[str, Any] | BaseException | None,
    *,
    unit: str,
    minimum: float | None = None,
    base_name: str | None = None,
    base: dict[str, Any] | BaseException | None = None,
    min_ratio: float | None = None,
    base_unit: str = "tx/s",
) -> Row:
    targets = []
    if minimum is not None:
        targets.append(f">= {fmt_int(minimum)} {unit}")
    if min_ratio is not None:
        targets.append(f">= {min_ratio:g}x {base_name}")
    row = Row(name, "not run", target=", ".join(targets) or "-")
    if result is None:
        row.met = False
        return row
    if isinstance(result, BaseException):
        row.figure, row.met = _error_text(result), False
        return row
    value = float(result["value"])
    row.figure, row.data = f"{fmt_int(value)} {unit}", result
    # CPU per unit: the server's when it runs on this machine, and the benchmark process's
    cpu = [
        f"{fmt_int(result[key])} us {name}"
        for key, name in (("pg_cpu_us", "server CPU"), ("py_cpu_us", "Python"))
        if key in result
    ]
    if cpu:
        row.figure += f" ({', '.join(cpu)} each)"
    met = minimum is None or value >= minimum
    if base_name is not None:
        if isinstance(base, dict):
            ratio = value / float(base["value"])
            row.baseline = f"{fmt_int(base['value'])} {base_unit} ({base_name})"
            row.ratio = f"{ratio:.2f}x"
            row.data = {**result, "ratio": ratio, "baseline": base["value"]}
            if min_ratio is not None:
                met = met and ratio >= min_ratio
        else:
            row.baseline, row.ratio = f"{base_name} unavailable", "n/a"
            met = False
    row.met = met
    return row


def build_rows(results: dict[str, dict[str, Any] | BaseException]) -> list[Row]:
    rows: list[Row] = []
    for name in ("baseline-1", "baseline-8"):
        r = results.get(name)
        if isinstance(r, dict):
            rows.append(Row(name, f"{fmt_int(r['value'])} tx/s", data=r))
        elif r is not None:
            rows.append(Row(name, _error_text(r)))
    b1, b8 = results.get("baseline-1"), results.get("baseline-8")
    if "chain" in results:
        rows.append(
            _rate_row(
                "chain",
                results["chain"],
                unit="steps/s",
                minimum=2000,
                base_name="baseline-1",
                base=b1,
                min_ratio=0.9,
            )
        )
    if "loop" in results:
        r = results["loop"]
        row = Row("loop", "not run", target="last / first tenth <= 1.5x")
        if isinstance(r, dict):
            row.figure = (
                f"{fmt_int(r['iterations_per_s'])} iterations/s; last / first tenth "
                f"{r['value']:.2f}x ({r['iterations']:,} iterations)"
            )
            row.met = r["value"] <= 1.5
            row.data = r
        else:
            row.figure, row.met = _error_text(r), False
        rows.append(row)
    if "fan-out" in results:
        rows.append(
            _rate_row(
                "fan-out",
                results["fan-out"],
                unit="steps/s",
                minimum=5000,
                base_name="baseline-8",
                base=b8,
                min_ratio=0.8,
            )
        )
    for name in ("fan-out-keyed", "fan-out-limited", "fan-out-limited-1"):
        if name in results:
            rows.append(
                _rate_row(
                    name,
                    results[name],
                    unit="steps/s",
                    base_name="fan-out",
                    base=results.get("fan-out"),
                    min_ratio=0.7,
                    base_unit="steps/s",
                )
            )
    if "drain" in results:
        rows.append(_rate_row("drain", results["drain"], unit="runs/s", minimum=3000))
    if "drain-vs-pgqueuer" in results:
        r = results["drain-vs-pgqueuer"]
        row = Row("drain vs pgqueuer", "not run", target=">= 1x pgqueuer")
        if isinstance(r, rival.Skipped):
            row.figure = f"skipped: {r}"
        elif isinstance(r, dict):
            row.figure = f"{fmt_int(r['value'])} runs/s"
            row.baseline = f"{fmt_int(r['pgqueuer'])} jobs/s (pgqueuer, defaults)"
            row.ratio = f"{r['ratio']:.2f}x"
            row.met = r["ratio"] >= 1.0
            row.data = r
        else:
            row.figure, row.met = _error_text(r), False
        rows.append(row)
    if "start" in results:
        rows.append(_rate_row("start", results["start"], unit="runs/s", minimum=3000))
    if "latency" in results:
        r = results["latency"]
        row = Row("latency", "not run", target="p50 <= 3 ms, p99 <= 15 ms")
        if isinstance(r, dict):
            row.figure = f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
            row.met = r["p50_ms"] <= 3 and r["p99_ms"] <= 15
            row.data = r
        else:
            row.figure, row.met = _error_text(r), False
        rows.append(row)
    if "scale" in results:
        r = results["scale"]
        rows_label = (
            f"{r['rows']:,} rows in {r['months']} months; a month of "
            f"{r['drop']['runs']:,} runs dropped in {r['drop']['total_seconds']:.2f} s "
            f"(the history tables locked {r['drop']['seconds']:.3f} s of it)"
            if isinstance(r, dict)
            else ""
        )
        row = _rate_row(
            "scale",
            r,
            unit="steps/s",
            base_name="fan-out",
            base=results.get("fan-out"),
            min_ratio=0.9,
            base_unit="steps/s",
        )
        if rows_label:
            row.figure += f" ({rows_label})"
        rows.append(row)
    if "memory" in results:
        r = results["memory"]
        row = Row("memory", "not run", target="<= 150 MB")
        if isinstance(r, dict):
            row.figure = f"{r['rss_mb']:.1f} MB RSS, {r['runs']:,} parked"
            row.met = r["rss_mb"] <= 150
            row.data = r
        else:
            row.figure, row.met = _error_text(r), False
        rows.append(row)
    if "dashboard" in results:
        r = results["dashboard"]
        target = f"runs and run pages < {dashboard.TARGET_MS:g} ms"
        row = Row("dashboard", "not run", target=target)
        if isinstance(r, dict):
            pages = r["pages"]
            row.figure = (
                f"runs page p50 {pages['runs page']['p50_ms']:.0f} ms, run page p50 "
                f"{pages['run page']['p50_ms']:.0f} ms, slowest {r['value']:.0f} ms "
                f"({r['runs']:,} runs; workflows page {pages['workflows page']['p50_ms']:.0f} ms)"
            )
            row.met = r["value"] < dashboard.TARGET_MS
            row.data = r
        else:
            row.figure, row.met = _error_text(r), False
        rows.append(row)
    return rows


def render_table(rows: list[Row]) -> str:
    header = ("scenario", "figure", "baseline", "ratio", "target", "met")
    cells = [header] + [
        (r.scenario, r.figure, r.baseline, r.ratio, r.target, r.met_text) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def render_facts(machine: dict[str, Any], pg: dict[str, Any], sizes: Sizes) -> str:
    lines = [
        f"durable benchmarks ({sizes.name} run, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC})",
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, "
        f"{machine['implementation']} {machine['python']}, asyncpg {machine['asyncpg']}, "
        f"{machine['event_loop']}, "
        f"{machine['platform']}; load average {machine['load_average_at_start']}",
        f"postgres: {pg['server_version']} ({pg['source']}, {pg['server_addr']}); "
        + ", ".join(f"{k}={pg[k]}" for k in facts.SETTINGS),
        f"sizes: chain {sizes.chain_steps} steps; fan-out {sizes.fanout_runs} runs x "
        f"{sizes.fanout_steps} steps; drain {sizes.drain_runs:,} "
        f"runs; start {sizes.start_runs:,} from {sizes.start_callers} callers; latency "
        f"{sizes.latency_samples} samples; scale {sizes.scale_rows:,} rows in "
        f"{sizes.scale_months} months; memory "
        f"{sizes.memory_runs:,} runs; worker concurrency {sizes.concurrency}; baselines, fan-out "
        f"and scale are the median of {sizes.repeats} round(s)",
    ]
    return "\n".join(lines)


async def run_all(server_dsn: str, source: str, sizes: Sizes, only: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    machine = facts.machine()
    pg = await facts.postgres(server_dsn, source)
    print(render_facts(machine, pg, sizes), flush=True)
    results: dict[str, dict[str, Any] | BaseException] = {}
    results.update(await _baselines(server_dsn, sizes))
    for name in only:
        results[name] = await _measure(server_dsn, name, SCENARIOS[name], sizes)
    rows = build_rows(results)
    elapsed = time.perf_counter() - started
    print()
    print(render_table(rows))
    print()
    missed = [r.scenario for r in rows if r.met is False]
    print(
        f"targets met: {sum(r.met is True for r in rows)} of "
        f"{sum(r.met is not None for r in rows)}"
        + (f"; not met: {', '.join(missed)}" if missed else "")
    )
    if sizes.name != "full":
        print("note: --quick uses smaller sizes; the targets are defined for the full run.")
    load_end = facts.load_average()
    machine["load_average_at_end"] = load_end
    print(f"elapsed: {elapsed:.1f} s; load average at the end {load_end}")
    busy = (
        float(machine["load_average_at_start"].split()[0])
        if machine["load_average_at_start"] != "unknown"
        else 0.0
    )
    if busy > 0.5 * max(1, machine["nproc"]):
        print(
            f"warning: the machine was busy when the run started (load {busy:.2f} on "
            f"{machine['nproc']} CPUs); figures are lower than on an idle machine."
        )
    return {
        "mode": sizes.name,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 1),
        "machine": machine,
        "postgres": pg,
        "sizes": asdict(sizes),
        "rows": [
            {
                "scenario": r.scenario,
                "figure": r.figure,
                "baseline": r.baseline,
                "ratio": r.ratio,
                "target": r.target,
                "met": r.met,
                "data": r.data,
            }
            for r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated scenarios (default: all): " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="worker concurrency (default 16)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="worker batch size (default: the engine's)"
    )
    parser.add_argument(
        "--chain-size", type=int, default=None, help="worker chain size (default: the engine's)"
    )
    parser.add_argument(
        "--scale-rows",
        type=int,
        default=None,
        help="finished runs in history for the scale scenario (default 1,000,000; --quick "
        "100,000), e.g. 10000000 by hand: --only fan-out,scale --scale-rows 10000000",
    )
    parser.add_argument(
        "--scale-months",
        type=int,
        default=None,
        help="the months before this one the scale scenario's runs are spread over, each in "
        "its own partition (default 3)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.concurrency is not None:
        sizes = Sizes(**{**asdict(sizes), "concurrency": args.concurrency})
    if args.batch_size is not None:
        sizes = Sizes(**{**asdict(sizes), "batch_size": args.batch_size})
    if args.chain_size is not None:
        sizes = Sizes(**{**asdict(sizes), "chain_size": args.chain_size})
    if args.scale_rows is not None:
        if args.scale_rows < 1:
            parser.error("--scale-rows must be at least 1")
        sizes = Sizes(**{**asdict(sizes), "scale_rows": args.scale_rows})
    if args.scale_months is not None:
        if not 1 <= args.scale_months <= 24:
            parser.error("--scale-months must be from 1 to 24")
        sizes = Sizes(**{**asdict(sizes), "scale_months": args.scale_months})
    only = list(SCENARIOS) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    source = "DURABLE_DSN" if os.environ.get("DURABLE_DSN") else "throwaway durable.server"
    progress(f"provisioning PostgreSQL ({source})")
    with provision("DURABLE_DSN") as server_dsn:
        report = run_async(run_all(server_dsn, source, sizes, only))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
