"""The JSON API of the admin app (paths relative to its mount point):

    GET  /api/runs                 filters status, workflow, version, created_after,
                                   created_before, q (id or idempotency key); limit;
                                   cursor (the `next` of the previous page)
    GET  /api/runs/{id}            run, journal, attempts, mailbox, children, parent
    POST /api/runs/{id}/signal     {"name", "payload", "dedupe_key"}
    POST /api/runs/{id}/cancel|retry|pause|resume
    POST /api/runs/{id}/fork       {"from_node", "input"}
    POST /api/runs/bulk            {"action": "cancel"|"retry", "filter": {...}}
    GET  /api/workflows | /api/workers | /api/schedules | /api/limits | /api/throughput

Unknown run: 404; bad body or query: 422; an action the run's state refuses: 409;
missing or wrong token: 401; read-only token on a POST: 403. Errors are
`{"error": {"type": ..., "message": ...}}`.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from enum import Enum
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from durable.engine import Engine
from durable.errors import RunNotFound
from durable.web import data
from durable.web.actions import BadRequest, act, error, run_filter
from durable.web.actions import bulk as bulk_action

MAX_LIMIT = 500


async def _engine(request: Request) -> Engine:
    engine: Engine = await request.app.state.admin.engine()
    return engine


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def bad(exc: Exception) -> JSONResponse:
    return JSONResponse(error("BadRequest", str(exc)), status_code=422)


async def page_of_runs(engine: Engine, params: dict[str, Any]) -> dict[str, Any]:
    """One page of runs for the query `params` (raises BadRequest): {"runs", "next"}."""
    params = dict(params)
    limit_text = params.pop("limit", None) or "50"
    cursor = params.pop("cursor", None) or None
    try:
        limit = int(limit_text)
    except ValueError:
        raise BadRequest(f"limit must be an integer, got {limit_text!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    where, version = run_filter(params)
    runs = await engine.list_runs(
        version=version,
        status=where.status,
        workflow=where.workflow,
        created_after=where.created_after,
        created_before=where.created_before,
        search=where.search,
        before=cursor,
        limit=limit,
    )
    return {
        "runs": [data.summary(r) for r in runs],
        "next": runs[-1].id if len(runs) == limit else None,
    }


async def list_runs(request: Request) -> Response:
    try:
        page = await page_of_runs(await _engine(request), dict(request.query_params))
    except BadRequest as exc:
        return bad(exc)
    return JSONResponse(page)


async def get_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        detail = await data.run_detail(await _engine(request), run_id)
    except RunNotFound as exc:
        return JSONResponse(error("RunNotFound", str(exc)), status_code=404)
    return JSONResponse(detail)


async def action(request: Request) -> Response:
    name = request.path_params["action"]
    if name not in ("signal", "cancel", "retry", "pause", "resume", "fork"):
        return JSONResponse(error("NotFound", f"no action {name!r}"), status_code=404)
    try:
        body = await _body(request)
    except BadRequest as exc:
        return bad(exc)
    status, payload = await act(await _engine(request), request.path_params["run_id"], name, body)
    return JSONResponse(payload, status_code=status)


async def bulk(request: Request) -> Response:
    try:
        body = await _body(request)
    except BadRequest as exc:
        return bad(exc)
    status, payload = await bulk_action(await _engine(request), body)
    return JSONResponse(payload, status_code=status)


async def workflows(request: Request) -> Response:
    return JSONResponse({"workflows": await data.workflows(await _engine(request))})


async def workers(request: Request) -> Response:
    return JSONResponse({"workers": await data.workers(await _engine(request))})


async def schedules(request: Request) -> Response:
    infos = await (await _engine(request)).schedules()
    return JSONResponse({"schedules": [_plain(dataclasses.asdict(i)) for i in infos]})


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON values for a schedule's fields: times in ISO 8601, the status as its name."""
    return {
        k: v.isoformat() if isinstance(v, datetime) else (v.value if isinstance(v, Enum) else v)
        for k, v in row.items()
    }


async def limits(request: Request) -> Response:
    return JSONResponse({"limits": await data.limits(await _engine(request))})


async def throughput(request: Request) -> Response:
    text = request.query_params.get("minutes", "60")
    if not text.isdigit() or not 1 <= int(text) <= 1440:
        return bad(BadRequest("minutes must be an integer between 1 and 1440"))
    return JSONResponse(await data.throughput(await _engine(request), int(text)))
