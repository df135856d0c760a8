"""The admin ASGI app: the JSON API, the dashboard and `/metrics` on one Starlette app,
behind the token checks of `durable.web.auth`, with security headers on every answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from durable.engine import Engine
from durable.errors import ConfigurationError
from durable.web import api, pages
from durable.web.actions import error
from durable.web.auth import ADMIN, READ, SECURITY_HEADERS, Auth
from durable.web.metrics import metrics_endpoint

log = logging.getLogger("durable.web")

Endpoint = Callable[[Request], Awaitable[Response]]


class Admin:
    """What every endpoint shares: the engine (opened on first use when the app was given
    a DSN) and the auth settings."""

    def __init__(self, engine_or_dsn: Engine | str, auth: Auth, schema: str) -> None:
        if isinstance(engine_or_dsn, Engine):
            self._engine: Engine | None = engine_or_dsn
            self._owned = False
        elif isinstance(engine_or_dsn, str):
            self._engine = Engine(engine_or_dsn, schema=schema)
            self._owned = True
        else:
            raise ConfigurationError(
                f"admin_app needs a durable.Engine or a DSN, got {type(engine_or_dsn).__name__}"
            )
        self.auth = auth
        self._opened = False
        self._lock = asyncio.Lock()

    async def engine(self) -> Engine:
        """The engine, open."""
        assert self._engine is not None
        if self._owned and not self._opened:
            async with self._lock:
                if not self._opened:
                    # The dashboard reads and steers; it never migrates a database.
                    await self._engine.open(migrate=False)
                    self._opened = True
        return self._engine

    async def close(self) -> None:
        """Close the engine if this app opened it."""
        if self._owned and self._opened and self._engine is not None:
            await self._engine.close()
            self._opened = False


def is_api(request: Request) -> bool:
    path = str(request.scope["path"])[len(request.scope.get("root_path", "")) :]
    return path.startswith("/api/") or path == "/metrics"


def needs(role: str) -> Callable[[Endpoint], Endpoint]:
    """Guard an endpoint: a token of `role` (admin covers read), and for a POST proved by
    the session cookie, the CSRF token (form field `csrf` or header `X-CSRF-Token`)."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            admin: Admin = request.app.state.admin
            granted, how = admin.auth.role(request)
            request.state.role = granted
            request.state.auth_by = how
            if granted is None:
                return unauthorized(request)
            if role == ADMIN and granted != ADMIN:
                return forbidden(request, "the read-only token cannot change runs")
            if request.method == "POST" and how == "cookie":
                given = request.headers.get("x-csrf-token")
                if given is None and "form" in request.headers.get("content-type", ""):
                    given = str((await request.form()).get("csrf") or "") or None
                if not admin.auth.csrf_ok(request, given):
                    return forbidden(request, "missing or wrong CSRF token: reload the page")
            return await endpoint(request)

        return guarded

    return wrap


def unauthorized(request: Request) -> Response:
    if is_api(request):
        return JSONResponse(
            error("Unauthorized", "a valid token is needed (Authorization: Bearer ...)"),
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )
    return pages.login_page(request, status_code=401)


def forbidden(request: Request, message: str) -> Response:
    if is_api(request):
        return JSONResponse(error("Forbidden", message), status_code=403)
    return pages.message_page(request, "Not allowed", message, status_code=403)


class SecurityHeaders:
    """Adds the security headers to every response (pages, API, static files, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def admin_app(
    engine_or_dsn: Engine | str,
    *,
    token: str | None = None,
    read_only_token: str | None = None,
    insecure_no_auth: bool = False,
    schema: str = "durable",
) -> Starlette:
    """The admin app (JSON API, dashboard, `/metrics`) for an engine or a DSN, to mount in
    any ASGI app or serve on its own (`durable dashboard`).

    `token` grants everything, `read_only_token` the GET routes. Requests prove a token with
    `Authorization: Bearer ...` or through the dashboard's login form (an HttpOnly,
    SameSite=Strict cookie). `insecure_no_auth=True` drops the tokens and then answers only
    requests that reach a loopback address. Given a DSN, the app opens its own engine on
    first use (it never migrates); given an engine, open it yourself (e.g. in a lifespan).
    """
    auth = Auth(token, read_only_token, insecure_no_auth)
    admin = Admin(engine_or_dsn, auth, schema)
    static = Path(__file__).parent / "static"

    def guard(role: str, endpoint: Endpoint) -> Endpoint:
        return needs(role)(endpoint)

    routes = [
        Route("/", guard(READ, pages.home)),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/logout", guard(READ, pages.logout), methods=["POST"]),
        Route("/runs", guard(READ, pages.runs)),
        Route("/runs/{run_id}", guard(READ, pages.run)),
        Route("/runs/{run_id}/confirm/{action}", guard(ADMIN, pages.confirm)),
        Route("/runs/{run_id}/do/{action}", guard(ADMIN, pages.perform), methods=["POST"]),
        Route("/workflows", guard(READ, pages.workflows)),
        Route("/workers", guard(READ, pages.workers)),
        Route("/api/runs", guard(READ, api.list_runs)),
        Route("/api/runs/bulk", guard(ADMIN, api.bulk), methods=["POST"]),
        Route("/api/runs/{run_id}", guard(READ, api.get_run)),
        Route("/api/runs/{run_id}/{action}", guard(ADMIN, api.action), methods=["POST"]),
        Route("/api/workflows", guard(READ, api.workflows)),
        Route("/api/workers", guard(READ, api.workers)),
        Route("/api/schedules", guard(READ, api.schedules)),
        Route("/api/limits", guard(READ, api.limits)),
        Route("/api/throughput", guard(READ, api.throughput)),
        Route("/metrics", guard(READ, metrics_endpoint)),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        if is_api(request):
            return JSONResponse(error("NotFound", "no such route"), status_code=404)
        return pages.message_page(request, "Not found", "There is no such page.", status_code=404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse(error("MethodNotAllowed", "method not allowed"), status_code=405)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await admin.close()

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed},
        lifespan=lifespan,
    )
    app.state.admin = admin
    app.add_middleware(SecurityHeaders)
    return app
