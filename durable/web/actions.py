"""The actions an operator takes on runs, shared by the JSON API and the dashboard's forms:
each checks its body, calls the engine and says what happened as (HTTP status, JSON)."""

from __future__ import annotations

import inspect
from datetime import datetime
from typing import Any

from durable.engine import Engine
from durable.errors import ArgumentError, ArgumentTypeError, DurableError, RunNotFound
from durable.model import RunStatus
from durable.operations import RunFilter

ACTIONS = ("signal", "cancel", "retry", "pause", "resume", "fork")


class BadRequest(Exception):
    """A body or query the API cannot take: answered with 422."""


def error(kind: str, message: str) -> dict[str, Any]:
    """The body of an error answer."""
    return {"error": {"type": kind, "message": message}}


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name!r} is required")
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name!r} must be a non-empty string")
    return value


def _time(value: Any, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name!r} must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name!r} is not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()


def run_filter(values: dict[str, Any]) -> tuple[RunFilter, int | None]:
    """The filters of `GET /api/runs` (and a bulk action's `filter`), checked, and the
    version asked for (None: any)."""
    unknown = set(values) - {
        "status",
        "workflow",
        "version",
        "created_after",
        "created_before",
        "q",
    }
    if unknown:
        raise BadRequest(f"unknown filter(s): {', '.join(sorted(unknown))}")
    status = values.get("status") or None
    if status is not None and status not in {s.value for s in RunStatus}:
        known = ", ".join(s.value for s in RunStatus)
        raise BadRequest(f"unknown status {status!r} (one of: {known})")
    version = values.get("version")
    if version is not None and version != "":
        try:
            version = int(version)
        except (TypeError, ValueError):
            raise BadRequest(f"version must be an integer >= 1, got {version!r}") from None
        if version < 1:
            raise BadRequest(f"version must be an integer >= 1, got {version}")
    else:
        version = None
    for name in ("workflow", "q"):
        if values.get(name) is not None and not isinstance(values[name], str):
            raise BadRequest(f"{name!r} must be a string")
    where = RunFilter(
        status=status,
        workflow=values.get("workflow") or None,
        created_after=_time(values.get("created_after"), "created_after"),
        created_before=_time(values.get("created_before"), "created_before"),
        search=values.get("q") or None,
    )
    return where, version


def _accepts_dedupe(engine: Engine) -> bool:
    return "dedupe_key" in inspect.signature(engine.signal).parameters


async def act(engine: Engine, run_id: str, action: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Do `action` on run `run_id` with `body`: (200, what happened), (409, not done: the
    run is not in a state that allows it), 404 for an unknown run, 422 for a bad body."""
    try:
        return await _act(engine, run_id, action, body)
    except BadRequest as exc:
        return 422, error("BadRequest", str(exc))
    except RunNotFound as exc:
        return 404, error("RunNotFound", str(exc))
    except (ArgumentError, ArgumentTypeError) as exc:
        return 422, error(type(exc).__name__, str(exc))


async def _act(engine: Engine, run_id: str, action: str, body: dict[str, Any]) -> tuple[int, Any]:
    if action == "signal":
        name = _text(body, "name", required=True)
        assert name is not None
        dedupe = _text(body, "dedupe_key")
        extra: dict[str, Any] = {}
        if dedupe is not None:
            if not _accepts_dedupe(engine):
                raise BadRequest("dedupe_key is not supported by this version of durable")
            extra["dedupe_key"] = dedupe
        recorded = await engine.signal(run_id, name, body.get("payload"), **extra)
        if not recorded:
            return 409, error("Conflict", f"run {run_id} has finished: signal {name!r} dropped")
        return 200, {"run_id": run_id, "signal": name, "recorded": True}
    if action == "fork":
        from_node = _text(body, "from_node")
        new_input = body.get("input")
        if new_input is not None and not isinstance(new_input, dict):
            raise BadRequest("'input' must be a JSON object")
        fork_id = await engine.fork(run_id, from_node=from_node, input=new_input)
        return 200, {"run_id": fork_id, "forked_from": run_id}
    if action == "cancel":
        reason = _text(body, "reason") or "cancelled by an operator"
        done = await engine.cancel(run_id, reason=reason)
    elif action == "retry":
        done = await engine.retry(run_id)
    elif action == "pause":
        done = await engine.pause_run(run_id)
    elif action == "resume":
        done = await engine.resume_run(run_id)
    else:
        raise BadRequest(f"unknown action {action!r}")
    run = await engine.get_run(run_id, primary=True)  # the outcome, not a replica's past
    if not done:
        why = {
            "cancel": f"it is {run.status.value}",
            "retry": f"it is {run.status.value}, not failed",
            "pause": "it is paused already" if run.paused else f"it is {run.status.value}",
            "resume": "it is not paused",
        }[action]
        return 409, error("Conflict", f"run {run_id} was not {_past(action)}: {why}")
    return 200, {"run_id": run_id, _past(action): True, "status": run.status.value}


def _past(action: str) -> str:
    return {"cancel": "cancelled", "retry": "retried", "pause": "paused", "resume": "resumed"}[
        action
    ]


async def bulk(engine: Engine, body: dict[str, Any]) -> tuple[int, Any]:
    """`POST /api/runs/bulk`: {"action": "cancel"|"retry", "filter": {...}}."""
    try:
        action = body.get("action")
        if action not in ("cancel", "retry"):
            raise BadRequest("'action' must be 'cancel' or 'retry'")
        raw = body.get("filter")
        if not isinstance(raw, dict):
            raise BadRequest("'filter' must be an object of run filters")
        where, version = run_filter(raw)
        if where.empty and version is None:
            raise BadRequest("a bulk action needs at least one filter")
        if version is not None:
            raise BadRequest("bulk actions do not filter by 'version'; use the other filters")
        if action == "cancel":
            ids = await engine.cancel_runs(where, reason="cancelled by an operator (bulk)")
        else:
            ids = await engine.retry_runs(where)
    except BadRequest as exc:
        return 422, error("BadRequest", str(exc))
    except DurableError as exc:
        return 422, error(type(exc).__name__, str(exc))
    return 200, {"action": action, "count": len(ids), "runs": ids}
