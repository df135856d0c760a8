"""The dashboard: server-rendered pages (Jinja2) over the same data as the JSON API.

Every page reads without JavaScript; htmx (vendored in static/) refreshes the runs table
and an unfinished run's page in place. Actions go through a confirmation page whose form
posts (with its CSRF token) and redirects back, so they work without JavaScript too.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from durable.engine import Engine
from durable.errors import RunNotFound
from durable.model import RunStatus
from durable.web import data
from durable.web.actions import ACTIONS, BadRequest, act
from durable.web.api import page_of_runs
from durable.web.auth import ADMIN, COOKIE, SESSION_SECONDS

_env = Environment(
    loader=PackageLoader("durable.web", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["json"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False, default=str)

FLASH = {
    "cancelled": "The run is cancelled (its completed steps are compensated first).",
    "retried": "The run is retried from its failed node.",
    "paused": "The run is paused: no worker claims it until you resume it.",
    "resumed": "The run is resumed.",
    "signalled": "The signal is in the run's mailbox.",
    "forked": "This run is a fork: it started from the node you chose.",
}

FILTERS = ("status", "workflow", "version", "created_after", "created_before", "q")


def base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    admin = request.app.state.admin
    role = getattr(request.state, "role", None)
    how = getattr(request.state, "auth_by", "none")
    cookie = request.cookies.get(COOKIE)
    csrf = admin.auth.csrf_for(cookie) if how == "cookie" and cookie else ""
    html = _env.get_template(template).render(
        base=base(request),
        role=role,
        admin=role == ADMIN,
        logged_in=how == "cookie",
        csrf=csrf,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


def login_page(request: Request, status_code: int = 200, failed: bool = False) -> Response:
    path = request.scope["path"]
    query = request.url.query
    wanted = path + ("?" + query if query else "")
    return render(
        request, "login.html", status_code=status_code, next=wanted, failed=failed, page="login"
    )


def message_page(request: Request, title: str, message: str, status_code: int) -> Response:
    return render(request, "message.html", status_code, title=title, message=message, page="")


async def _engine(request: Request) -> Engine:
    engine: Engine = await request.app.state.admin.engine()
    return engine


# -- login -------------------------------------------------------------------------------


async def login(request: Request) -> Response:
    if request.method == "GET":
        return render(
            request, "login.html", next=request.query_params.get("next", ""), page="login"
        )
    form = await request.form()
    auth = request.app.state.admin.auth
    role = auth.role_of_token(str(form.get("token") or ""))
    if role is None:
        return render(request, "login.html", 401, next=str(form.get("next") or ""), failed=True)
    target = str(form.get("next") or "")
    home = base(request) + "/runs"
    if not target.startswith(base(request) + "/") or target.startswith("//") or "login" in target:
        target = home
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        auth.cookie_for(role),
        max_age=SESSION_SECONDS,
        path=base(request) or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse(base(request) + "/login", status_code=303)
    response.delete_cookie(COOKIE, path=base(request) or "/")
    return response


async def home(request: Request) -> Response:
    return RedirectResponse(base(request) + "/runs", status_code=303)


# -- runs --------------------------------------------------------------------------------


async def runs(request: Request) -> Response:
    params = {k: v for k, v in request.query_params.items() if v != ""}
    filters = {k: params.get(k, "") for k in FILTERS}
    engine = await _engine(request)
    try:
        page = await page_of_runs(engine, {k: v for k, v in params.items() if k != "flash"})
        problem = None
    except BadRequest as exc:
        page, problem = {"runs": [], "next": None}, str(exc)
    kept = {k: v for k, v in filters.items() if v}
    older = (
        base(request) + "/runs?" + urlencode({**kept, "cursor": page["next"]})
        if page["next"]
        else None
    )
    return render(
        request,
        "runs.html",
        422 if problem else 200,
        page="runs",
        runs=page["runs"],
        filters=filters,
        problem=problem,
        older=older,
        newest=base(request) + "/runs?" + urlencode(kept),
        paged=bool(params.get("cursor")),
        statuses=[s.value for s in RunStatus],
        workflows=sorted(engine.workflows) or None,
        self_url=str(request.url.path) + ("?" + request.url.query if request.url.query else ""),
    )


async def run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        detail = await data.run_detail(await _engine(request), run_id)
    except RunNotFound:
        return message_page(request, "Not found", f"No run has the id {run_id}.", 404)
    return render(
        request,
        "run.html",
        page="runs",
        run=detail,
        finished=detail["status"] in ("completed", "failed", "cancelled"),
        flash=FLASH.get(request.query_params.get("flash", "")),
        actions=_actions(detail),
    )


def _actions(run: dict[str, Any]) -> list[str]:
    """The actions the run's state allows."""
    status, paused = run["status"], run["paused"]
    found = []
    if status in ("pending", "running", "waiting"):
        found += ["signal", "resume" if paused else "pause", "cancel"]
    if status == "compensating":
        found.append("resume" if paused else "pause")
    if status == "failed":
        found.append("retry")
    found.append("fork")
    return found


async def confirm(request: Request, problem: str | None = None, status_code: int = 200) -> Response:
    run_id, action = request.path_params["run_id"], request.path_params["action"]
    if action not in ACTIONS:
        return message_page(request, "Not found", f"There is no action {action!r}.", 404)
    try:
        detail = await data.run_detail(await _engine(request), run_id)
    except RunNotFound:
        return message_page(request, "Not found", f"No run has the id {run_id}.", 404)
    default_from = next(
        (e["node"] for e in detail["journal"] if e["status"] == "failed" and "@" not in e["key"]),
        detail["current_node"],
    )
    form = await request.form() if request.method == "POST" else {}
    return render(
        request,
        "confirm.html",
        status_code,
        page="runs",
        run=detail,
        action=action,
        problem=problem,
        default_from=str(form.get("from_node") or default_from or ""),
        input_text=str(form.get("input") or json.dumps(detail["input"], indent=2)),
        signal_name=str(form.get("name") or ""),
        payload_text=str(form.get("payload") or "null"),
    )


async def perform(request: Request) -> Response:
    run_id, action = request.path_params["run_id"], request.path_params["action"]
    if action not in ACTIONS:
        return message_page(request, "Not found", f"There is no action {action!r}.", 404)
    form = await request.form()
    body: dict[str, Any] = {}
    try:
        if action == "signal":
            body = {"name": str(form.get("name") or "") or None}
            body["payload"] = _json_field(form.get("payload"), "payload")
        elif action == "fork":
            body = {
                "from_node": str(form.get("from_node") or "") or None,
                "input": _json_field(form.get("input"), "input"),
            }
        elif action == "cancel":
            body = {"reason": str(form.get("reason") or "") or None}
    except BadRequest as exc:
        return await confirm(request, str(exc), 422)
    status, payload = await act(await _engine(request), run_id, action, body)
    if status == 404:
        return message_page(request, "Not found", payload["error"]["message"], 404)
    if status != 200:
        return await confirm(request, payload["error"]["message"], status)
    target = payload["run_id"]
    flash = {"signal": "signalled", "fork": "forked"}.get(action) or {
        "cancel": "cancelled",
        "retry": "retried",
        "pause": "paused",
        "resume": "resumed",
    }[action]
    return RedirectResponse(f"{base(request)}/runs/{target}?flash={flash}", status_code=303)


def _json_field(value: Any, name: str) -> Any:
    text = str(value or "").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{name} is not valid JSON: {exc}") from None


# -- workflows and workers ---------------------------------------------------------------


async def workflows(request: Request) -> Response:
    engine = await _engine(request)
    series = await data.throughput(engine, 60)
    return render(
        request,
        "workflows.html",
        page="workflows",
        workflows=await data.workflows(engine),
        queues=await data.queues(engine),
        series=series,
        finished_last_hour=sum(series["completed"]) + sum(series["failed"]),
        statuses=[s.value for s in RunStatus],
    )


async def workers(request: Request) -> Response:
    return render(
        request, "workers.html", page="workers", workers=await data.workers(await _engine(request))
    )
