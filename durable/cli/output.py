"""What the `durable` command writes: tables, run timelines, JSON, and log lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from durable.model import Run, RunStatus
from durable.versions import CAUSES, CheckReport, UpgradeReport

Out = TextIO

# The structured fields durable's log records carry, in the order the formatter prints them.
LOG_FIELDS = ("run_id", "workflow", "node", "attempt", "worker")


def local_time(value: datetime | None) -> str:
    """A timestamp in local time with its UTC offset, e.g. `2026-05-01 14:03:07+02:00`."""
    if value is None:
        return "-"
    return value.astimezone().isoformat(sep=" ", timespec="seconds")


def human_duration(seconds: float) -> str:
    """`840 ms` under 10 s, `12.4 s` under 10 min, then `14.2 min`."""
    if seconds < 10:
        ms = seconds * 1000
        return "<1 ms" if ms < 1 else f"{ms:.0f} ms"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _ms(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    if seconds < 0:
        return "-"  # clocks disagree (the end was stamped at its transaction's start)
    return human_duration(seconds)


def one_line(text: str | None, width: int = 120) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render rows as a plain-text table with aligned columns."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def timeline_lines(run: Run, indent: str = "  ") -> list[str]:
    """A run's journal and failed attempts in time order, one line per event.

    Each line: the offset from the run's creation (ms, then s past 10 s, then min past
    10 min), the journal key (`node`,
    `node@compensate`, ...), the outcome (`completed`, `failed`, or `retried` for an attempt
    that failed and was tried again), the attempt number, how long it took, and the error.
    Needs a `Run` read with `get_run(id, journal=True)`.
    """
    # The final failed attempt of a node is both an attempt row and its failed journal row.
    final = {(e.key, e.attempts) for e in run.journal if e.status == "failed"}
    events: list[tuple[datetime, int, tuple[str, str, str, str, str]]] = []
    for seq, entry in enumerate(run.journal):
        when = entry.started_at or entry.finished_at
        events.append(
            (
                when,
                2 * seq + 1,
                (
                    entry.key,
                    entry.status,
                    f"attempt {entry.attempts}",
                    _ms(entry.started_at, entry.finished_at),
                    one_line(entry.error),
                ),
            )
        )
    for seq, attempt in enumerate(run.attempts):
        if (attempt.key, attempt.attempt) in final:
            continue
        when = attempt.started_at or attempt.failed_at
        events.append(
            (
                when,
                2 * seq,
                (
                    attempt.key,
                    "retried",
                    f"attempt {attempt.attempt}",
                    _ms(attempt.started_at, attempt.failed_at),
                    one_line(attempt.error),
                ),
            )
        )
    if not events:
        return [f"{indent}(no journal entries yet)"]
    events.sort(key=lambda e: (e[0], e[1]))
    rows: list[tuple[str, str, str, str, str, str]] = []
    for when, _, cells in events:
        since = max((when - run.created_at).total_seconds(), 0.0)
        rows.append(
            (f"+{since * 1000:.0f} ms" if since < 10 else f"+{human_duration(since)}", *cells)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines: list[str] = []
    for offset, key, outcome, tried, took, error in rows:
        text = (
            f"{indent}{offset.rjust(widths[0])}  {key.ljust(widths[1])}  "
            f"{outcome.ljust(widths[2])}  {tried.ljust(widths[3])}  {took.rjust(widths[4])}"
        )
        lines.append(f"{text}  {error}" if error else text)
    return lines


def run_to_json(run: Run, *, journal: bool = False) -> dict[str, Any]:
    """A run as a JSON-ready dict (with its journal and attempts when `journal`).

    `results` is every completed node's result; once the run has completed it is also the
    run's result, so `Run.result` is not repeated.
    """
    data: dict[str, Any] = {
        "id": run.id,
        "workflow": run.workflow,
        "version": run.version,
        "status": run.status.value,
        "current_node": run.current_node,
        "parent_id": run.parent_id,
        "input": run.input,
        "results": run.results,
        "error": run.error,
        "created_at": _iso(run.created_at),
        "updated_at": _iso(run.updated_at),
        "finished_at": _iso(run.finished_at),
        "children": list(run.children),
    }
    if journal:
        data["journal"] = [
            {
                "key": e.key,
                "node": e.node,
                "status": e.status,
                "result": e.result,
                "error": e.error,
                "attempts": e.attempts,
                "started_at": _iso(e.started_at),
                "finished_at": _iso(e.finished_at),
            }
            for e in run.journal
        ]
        data["attempts"] = [
            {
                "key": a.key,
                "attempt": a.attempt,
                "error": a.error,
                "started_at": _iso(a.started_at),
                "failed_at": _iso(a.failed_at),
            }
            for a in run.attempts
        ]
    return data


def run_details(run: Run) -> list[str]:
    """A run's fields and its timeline, as `durable runs show` prints them."""
    fields = [
        ("run", run.id),
        ("workflow", f"{run.workflow} (version {run.version})"),
        ("status", run.status.value),
        ("node", run.current_node or "-"),
        ("parent", run.parent_id or "-"),
        ("created", local_time(run.created_at)),
        ("updated", local_time(run.updated_at)),
        ("finished", local_time(run.finished_at)),
        ("input", one_line(json.dumps(run.input), 200)),
    ]
    if run.children:
        fields.append(("children", ", ".join(run.children)))
    if run.error:
        fields.append(("error", one_line(run.error, 200)))
    if run.status is RunStatus.COMPLETED:
        fields.append(("result", one_line(json.dumps(run.result), 200)))
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]
    lines += ["", "timeline (offset from creation, key, outcome, attempt, duration, error):"]
    lines += timeline_lines(run)
    return lines


# What to do about runs stranded for each cause, as `durable check` suggests it.
_REMEDIES = {
    "unknown_workflow": "keep a worker that registers this workflow running until they finish",
    "unknown_version": (
        "keep this version registered until they finish, or move them with "
        "`durable runs upgrade WORKFLOW --from VERSION`"
    ),
    "shape_changed": (
        "bump the version of the changed definition and keep the old one registered, or "
        "move them with `durable runs upgrade WORKFLOW --from VERSION --to VERSION`"
    ),
}


def check_lines(report: CheckReport, *, limit: int = 10) -> list[str]:
    """`durable check`'s report: a summary, then each cause with its runs (the first
    `limit` ids of each queue) and what to do."""
    if report.ok:
        return [
            f"ok: this code can continue all {report.unfinished} unfinished run(s)",
        ]
    stranded = report.unfinished - report.continuable
    lines = [
        f"not ok: {stranded} of {report.unfinished} unfinished run(s) cannot be continued "
        "by this code"
    ]
    for cause, groups in report.by_cause().items():
        lines += ["", f"{CAUSES[cause]} ({_REMEDIES[cause]}):"]
        for g in groups:
            lines.append(
                f"  {g.workflow} version {g.version}: {len(g.run_ids)} run(s) on queue {g.queue}"
            )
            if cause == "shape_changed":
                what = "its shape is not recorded" if g.diff is None else str(g.diff)
                lines.append(f"    this code's version {g.version}: {what}")
            shown = ", ".join(g.run_ids[:limit])
            more = f" and {len(g.run_ids) - limit} more" if len(g.run_ids) > limit else ""
            lines.append(f"    runs: {shown}{more}")
    return lines


def upgrade_lines(report: UpgradeReport) -> list[str]:
    """`durable runs upgrade`'s report: what moved (or would), and each refusal."""
    verb = "would move" if report.dry_run else "moved"
    lines = [
        f"{verb} {len(report.moved)} run(s) of {report.workflow} from version "
        f"{report.from_version} to version {report.to_version}; refused {len(report.refused)}"
    ]
    lines += [f"  {r.run_id}: {r.reason}" for r in report.refused]
    return lines


def failed_node(run: Run) -> str | None:
    """The node whose failure ended `run` (read with `journal=True`), if any."""
    for entry in run.journal:
        if entry.status == "failed" and "@" not in entry.key:
            return entry.node
    return None


def emit_json(out: Out, value: Any) -> None:
    """Write `value` to `out` as indented JSON (values JSON cannot hold as their `str`)."""
    out.write(json.dumps(value, indent=2, default=str) + "\n")


class FieldFormatter(logging.Formatter):
    """A log format that keeps durable's structured fields visible in plain text.

    durable's records carry `run_id`, `workflow`, `node`, `attempt` and `worker` as
    attributes (`extra=`); a plain format string drops them, so two retries of different
    runs would read the same. This formatter appends the ones a record has, e.g.
    `... charge attempt 2 failed, retrying in 4.00 s: ... [run_id=01J... workflow=order]`,
    skipping any value the message already shows. The `durable` command logs with it; use
    it in your own logging configuration (`"()": "durable.cli.FieldFormatter"`).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted line with the record's durable fields appended."""
        text = super().formatMessage(record)
        message = record.getMessage()
        fields = [
            f"{name}={value}"
            for name in LOG_FIELDS
            if (value := getattr(record, name, None)) is not None
            and not (name in ("run_id", "workflow") and str(value) in message)
        ]
        return f"{text} [{' '.join(fields)}]" if fields else text


DEFAULT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None, command: str | None) -> None:
    """Log to stderr with `FieldFormatter` at `level`, or at the default for `command`."""
    if level is None:
        if command == "worker":
            level = "info"
        elif command == "demo":
            return  # the demo prints its own progress; it keeps library logs quiet
        else:
            level = "warning"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FieldFormatter(DEFAULT_LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
