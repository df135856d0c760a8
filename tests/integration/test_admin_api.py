"""The admin app's JSON API, in process (httpx.ASGITransport): every route, status code
and auth rule of SPEC "Operating surface", and no token in any response or log line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import durable
from durable.web import admin_app
from durable.web.auth import COOKIE
from tests.integration.helpers import eventually, fetchval, open_engine, running_engine
from tests.integration.test_run_actions import order, until

ADMIN = "admin-token-0123456789"
READ = "read-token-0123456789"
BEARER = {"authorization": f"Bearer {ADMIN}"}
READ_BEARER = {"authorization": f"Bearer {READ}"}


def client_for(engine: durable.Engine, **options: Any) -> httpx.AsyncClient:
    """A client of the admin app mounted at /durable in another app."""
    app = Starlette(
        routes=[
            Mount(
                "/durable",
                admin_app(engine, token=ADMIN, read_only_token=READ, **options),
            )
        ]
    )
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver/durable"
    )


@contextlib.asynccontextmanager
async def serve(db: Any) -> AsyncIterator[tuple[durable.Engine, httpx.AsyncClient]]:
    """An engine with a worker, and a client of its admin app."""
    async with running_engine(db, order()) as engine, client_for(engine) as client:
        yield engine, client


GETS = [
    "/api/runs",
    "/api/workflows",
    "/api/workers",
    "/api/schedules",
    "/api/limits",
    "/api/throughput",
    "/metrics",
]
POSTS = ["signal", "cancel", "retry", "pause", "resume", "fork"]


# -- auth --------------------------------------------------------------------------------


async def test_every_route_needs_a_token(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order")
        paths = [*GETS, f"/api/runs/{run_id}", "/runs", f"/runs/{run_id}", "/workflows", "/workers"]
        for path in paths:
            for headers in (
                {},
                {"authorization": "Bearer wrong-token-0123456789"},
                {"authorization": ADMIN},
            ):
                response = await client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
            assert (await client.get(path, headers=BEARER)).status_code == 200, path
            assert (await client.get(path, headers=READ_BEARER)).status_code == 200, path
        for action in POSTS:
            response = await client.post(f"/api/runs/{run_id}/{action}", json={})
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "Unauthorized"
        assert (await client.post("/api/runs/bulk", json={})).status_code == 401


async def test_the_read_only_token_cannot_post(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order")
        for action in POSTS:
            response = await client.post(
                f"/api/runs/{run_id}/{action}", json={"name": "approved"}, headers=READ_BEARER
            )
            assert response.status_code == 403, action
            assert response.json()["error"]["type"] == "Forbidden"
        bulk = {"action": "cancel", "filter": {"workflow": "order"}}
        assert (
            await client.post("/api/runs/bulk", json=bulk, headers=READ_BEARER)
        ).status_code == 403
        assert not (await engine.get_run(run_id)).paused


async def test_login_sets_a_strict_http_only_cookie_that_needs_csrf_to_post(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order")
        bad = await client.post("/login", data={"token": "nope", "next": "/durable/runs"})
        assert bad.status_code == 401
        assert COOKIE not in bad.headers.get("set-cookie", "")
        response = await client.post("/login", data={"token": ADMIN, "next": "/durable/runs"})
        assert response.status_code == 303
        assert response.headers["location"] == "/durable/runs"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/durable" in cookie
        assert ADMIN not in cookie
        # the cookie reads
        assert (await client.get("/api/runs")).status_code == 200
        page = await client.get(f"/runs/{run_id}/confirm/pause")
        assert page.status_code == 200
        # a POST without the CSRF token is refused; with it, it goes through
        assert (await client.post(f"/api/runs/{run_id}/pause")).status_code == 403
        assert (await client.post(f"/runs/{run_id}/do/pause", data={})).status_code == 403
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        assert csrf
        done = await client.post(f"/runs/{run_id}/do/pause", data={"csrf": csrf})
        assert done.status_code == 303
        assert (await engine.get_run(run_id)).paused
        response = await client.post(
            f"/api/runs/{run_id}/resume", headers={"x-csrf-token": csrf}, json={}
        )
        assert response.status_code == 200
        # a forged or tampered cookie proves nothing
        client.cookies.set(COOKIE, "admin.99999999999.deadbeef", path="/durable")
        assert (await client.get("/api/runs")).status_code == 401
        # logging out forgets the cookie
        client.cookies.clear()
        read = await client.post("/login", data={"token": READ, "next": "https://evil.example/"})
        assert read.headers["location"] == "/durable/runs"  # no open redirect
        assert (await client.get("/api/runs")).status_code == 200
        page = await client.get(f"/runs/{run_id}")
        assert "confirm/cancel" not in page.text  # no actions for the read-only role
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        assert (
            await client.post(f"/runs/{run_id}/do/pause", data={"csrf": csrf})
        ).status_code == 403
        out = await client.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert (await client.get("/api/runs")).status_code == 401


async def test_security_headers_on_every_answer(db: Any) -> None:
    async with serve(db) as (_, client):
        for path, headers in (
            ("/api/runs", BEARER),
            ("/runs", BEARER),
            ("/api/runs", {}),
            ("/login", {}),
            ("/static/htmx.min.js", {}),
        ):
            response = await client.get(path, headers=headers)
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert "frame-ancestors 'none'" in csp
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"


async def test_insecure_no_auth_answers_only_on_loopback(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        app = admin_app(engine, insecure_no_auth=True)
        for host, code in (("127.0.0.1", 200), ("10.1.2.3", 401)):
            transport = httpx.ASGITransport(app=app, client=(host, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                # the server address is what counts; ASGITransport reports it from the URL
                url = f"http://{host}/api/runs"
                assert (await client.get(url)).status_code == code
        with pytest.raises(durable.ConfigurationError):
            admin_app(engine)
        with pytest.raises(durable.ConfigurationError):
            admin_app(engine, token="short")
        with pytest.raises(durable.ConfigurationError):
            admin_app(engine, token=ADMIN, insecure_no_auth=True)


# -- runs --------------------------------------------------------------------------------


async def test_list_runs_filters_and_pages_by_keyset(db: Any) -> None:
    async with serve(db) as (engine, client):
        ids = [await engine.start("order", {"n": i}, idempotency_key=f"k{i}") for i in range(7)]
        for run_id in ids:
            await until(engine, run_id, durable.RunStatus.WAITING)
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/api/runs", params=params, headers=BEARER)).json()
            seen += [r["id"] for r in page["runs"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == sorted(ids, reverse=True)
        body = (await client.get("/api/runs", params={"q": "k3"}, headers=BEARER)).json()
        assert [r["id"] for r in body["runs"]] == [ids[3]]
        body = (await client.get("/api/runs", params={"q": ids[5]}, headers=BEARER)).json()
        assert [r["id"] for r in body["runs"]] == [ids[5]]
        for params, count in (
            ({"status": "waiting"}, 7),
            ({"status": "failed"}, 0),
            ({"workflow": "order"}, 7),
            ({"workflow": "other"}, 0),
            ({"version": "1"}, 7),
            ({"version": "2"}, 0),
            ({"created_after": "2000-01-01T00:00:00Z"}, 7),
            ({"created_before": "2000-01-01T00:00:00+00:00"}, 0),
        ):
            body = (await client.get("/api/runs", params=params, headers=BEARER)).json()
            assert len(body["runs"]) == count, params
        for params in (
            {"status": "bogus"},
            {"version": "x"},
            {"version": "0"},
            {"limit": "0"},
            {"limit": "many"},
            {"created_after": "yesterday"},
            {"colour": "red"},
        ):
            response = await client.get("/api/runs", params=params, headers=BEARER)
            assert response.status_code == 422, params
            assert response.json()["error"]["type"] == "BadRequest"
        await engine.cancel_runs(durable.RunFilter(workflow="order"))


async def test_get_run_has_journal_attempts_mailbox_children_and_parent(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order", {"sku": "A1"})
        await until(engine, run_id, durable.RunStatus.WAITING)
        await engine.signal(run_id, "approved", {"by": "ann"})
        await engine.wait(run_id, timeout=10)
        body = (await client.get(f"/api/runs/{run_id}", headers=BEARER)).json()
        assert body["status"] == "completed"
        assert [e["key"] for e in body["journal"]] == ["reserve", "charge", "approval", "ship"]
        assert body["attempts"] == []
        assert body["mailbox"][0]["name"] == "approved"
        assert body["mailbox"][0]["payload"] == {"by": "ann"}
        assert body["mailbox"][0]["consumed_by"] == "approval"
        assert body["children"] == []
        assert body["parent"] is None
        assert [b["key"] for b in body["timeline"]] == ["reserve", "charge", "approval", "ship"]
        missing = await client.get("/api/runs/nope", headers=BEARER)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "RunNotFound"


async def test_a_child_run_links_to_its_parent(db: Any) -> None:
    child = durable.Workflow("child")

    @child.step
    async def work(ctx: durable.Context) -> int:
        return 1

    parent = durable.Workflow("parent")
    parent.child_workflow("kid", lambda ctx: ("child", {}))
    async with running_engine(db, parent, child) as engine, client_for(engine) as client:
        run_id = await engine.start("parent")
        await engine.wait(run_id, timeout=10)
        body = (await client.get(f"/api/runs/{run_id}", headers=BEARER)).json()
        kid = body["children"][0]
        assert (kid["workflow"], kid["status"]) == ("child", "completed")
        body = (await client.get(f"/api/runs/{kid['id']}", headers=BEARER)).json()
        assert body["parent"] == {"id": run_id, "workflow": "parent", "status": "completed"}


# -- actions -----------------------------------------------------------------------------


async def test_signal_cancel_pause_resume_answer_200_409_404_422(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order")
        await until(engine, run_id, durable.RunStatus.WAITING)
        post = client.post
        url = f"/api/runs/{run_id}"
        assert (await post(f"{url}/pause", headers=BEARER)).json()["paused"] is True
        assert (await post(f"{url}/pause", headers=BEARER)).status_code == 409
        response = await post(
            f"{url}/signal", json={"name": "approved", "payload": 1}, headers=BEARER
        )
        assert response.status_code == 200
        assert response.json()["recorded"] is True
        assert (await post(f"{url}/resume", headers=BEARER)).status_code == 200
        assert (await post(f"{url}/resume", headers=BEARER)).status_code == 409
        await engine.wait(run_id, timeout=10)
        assert (
            await post(f"{url}/signal", json={"name": "approved"}, headers=BEARER)
        ).status_code == 409
        assert (await post(f"{url}/cancel", headers=BEARER)).status_code == 409
        assert (await post(f"{url}/retry", headers=BEARER)).status_code == 409
        # bad bodies
        for body in ({}, {"name": ""}, {"name": 3}, {"name": "nope"}):
            response = await post(f"{url}/signal", json=body, headers=BEARER)
            assert response.status_code in (409, 422), body
        other = await engine.start("order")
        for body in ({}, {"name": ""}, {"name": "nope"}, {"name": "approved", "dedupe_key": 5}):
            response = await post(f"/api/runs/{other}/signal", json=body, headers=BEARER)
            assert response.status_code == 422, body
        for raw in (b"{not json", b"[1, 2]"):
            response = await post(f"/api/runs/{other}/cancel", content=raw, headers=BEARER)
            assert response.status_code == 422
        cancelled = await post(f"/api/runs/{other}/cancel", json={"reason": "test"}, headers=BEARER)
        assert cancelled.status_code == 200
        assert cancelled.json()["cancelled"] is True
        for action in POSTS:
            response = await post(
                f"/api/runs/nope/{action}", json={"name": "approved"}, headers=BEARER
            )
            assert response.status_code == 404, action
        assert (await post(f"{url}/explode", headers=BEARER)).status_code == 404


async def test_retry_and_fork_a_failed_run(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order", {"card": "bad"})
        await until(engine, run_id, durable.RunStatus.FAILED)
        url = f"/api/runs/{run_id}"
        response = await client.post(
            f"{url}/fork", json={"from_node": "charge", "input": {"card": "good"}}, headers=BEARER
        )
        assert response.status_code == 200
        fork_id = response.json()["run_id"]
        await until(engine, fork_id, durable.RunStatus.WAITING)
        assert (await engine.get_run(fork_id)).forked_from == run_id
        for body in ({"from_node": "nope"}, {"input": [1]}, {"from_node": 3}):
            assert (await client.post(f"{url}/fork", json=body, headers=BEARER)).status_code == 422
        response = await client.post(f"{url}/retry", headers=BEARER)
        assert response.status_code == 200
        assert response.json()["retried"] is True
        await eventually(lambda: _epoch_failed(engine, run_id))
        await engine.cancel(fork_id)


async def _epoch_failed(engine: durable.Engine, run_id: str) -> bool:
    epoch = await fetchval(engine, "SELECT epoch FROM durable.runs WHERE id = $1", run_id)
    return epoch == 1 and (await engine.get_run(run_id)).status is durable.RunStatus.FAILED


async def test_bulk_cancel_and_retry(db: Any) -> None:
    async with serve(db) as (engine, client):
        waiting = [await engine.start("order") for _ in range(3)]
        for run_id in waiting:
            await until(engine, run_id, durable.RunStatus.WAITING)
        for body in (
            {},
            {"action": "explode", "filter": {"status": "waiting"}},
            {"action": "cancel"},
            {"action": "cancel", "filter": {}},
            {"action": "cancel", "filter": {"version": 1}},
            {"action": "cancel", "filter": {"status": "bogus"}},
            {"action": "cancel", "filter": {"colour": "red"}},
        ):
            response = await client.post("/api/runs/bulk", json=body, headers=BEARER)
            assert response.status_code == 422, body
        body = {"action": "cancel", "filter": {"status": "waiting", "workflow": "order"}}
        response = await client.post("/api/runs/bulk", json=body, headers=BEARER)
        assert response.status_code == 200
        assert sorted(response.json()["runs"]) == sorted(waiting)
        body = {"action": "retry", "filter": {"workflow": "order"}}
        response = await client.post("/api/runs/bulk", json=body, headers=BEARER)
        assert response.json() == {"action": "retry", "count": 0, "runs": []}


# -- workflows, workers, schedules, limits, metrics ----------------------------------------


async def test_workflows_workers_schedules_limits(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order")
        await until(engine, run_id, durable.RunStatus.WAITING)
        body = (await client.get("/api/workflows", headers=BEARER)).json()
        (wf,) = body["workflows"]
        assert (wf["name"], wf["versions"], wf["registered"]) == ("order", [1], True)
        assert wf["counts"]["waiting"] == 1
        assert wf["shapes"][0]["nodes"] == ["reserve", "charge", "approval", "ship"]

        async def workers() -> list[Any]:
            return list((await client.get("/api/workers", headers=BEARER)).json()["workers"])

        (worker,) = await eventually(workers)
        assert worker["alive"] is True
        assert worker["concurrency"] == 4
        assert set(worker) >= {"host", "pid", "in_flight", "last_heartbeat"}
        assert (await client.get("/api/schedules", headers=BEARER)).json() == {"schedules": []}
        assert (await client.get("/api/limits", headers=BEARER)).json() == {"limits": []}
        series = (await client.get("/api/throughput?minutes=5", headers=BEARER)).json()
        assert len(series["minutes"]) == 5
        assert (await client.get("/api/throughput?minutes=0", headers=BEARER)).status_code == 422
        await engine.cancel(run_id)


async def test_metrics_in_prometheus_text_format(db: Any) -> None:
    async with serve(db) as (engine, client):
        run_id = await engine.start("order", {"card": "bad"})
        await until(engine, run_id, durable.RunStatus.FAILED)
        waiting = await engine.start("order")
        await until(engine, waiting, durable.RunStatus.WAITING)
        response = await client.get("/metrics", headers=READ_BEARER)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        for line in (
            'durable_runs{status="failed",workflow="order"} 1.0',
            'durable_runs{status="waiting",workflow="order"} 1.0',
            "durable_workers_alive 1.0",
            "# TYPE durable_queue_depth gauge",
            "# TYPE durable_oldest_due_job_age_seconds gauge",
            "# TYPE durable_limit_in_use gauge",
            "# TYPE durable_runs_started_total counter",
            "# TYPE durable_runs_finished_total counter",
            "# TYPE durable_node_attempts_total counter",
            "# TYPE durable_node_failures_total counter",
            "# TYPE durable_node_duration_seconds histogram",
        ):
            assert line in text, line
        assert 'durable_runs_finished_total{status="failed",workflow="order"}' in text
        assert 'durable_node_failures_total{final="true",node="charge",workflow="order"}' in text
        assert (
            'durable_node_duration_seconds_bucket{le="+Inf",node="reserve",workflow="order"}'
            in text
        )
        await engine.cancel(waiting)


async def test_a_workers_node_series_exist_from_zero_before_any_job(db: Any) -> None:
    """A worker creates its workflows' per-node series when it starts: Prometheus sees
    them at 0, and the first job of each node does not pay for making them."""
    from prometheus_client import REGISTRY, generate_latest

    wf = durable.Workflow("declared_nodes")
    wf.step("never_ran", lambda ctx: None)
    async with durable.Engine(db.dsn, workflows=[wf]) as engine, engine.worker(concurrency=1):
        text = generate_latest(REGISTRY).decode()
    assert 'durable_node_attempts_total{node="never_ran",workflow="declared_nodes"} 0.0' in text
    assert (
        'durable_node_duration_seconds_count{node="never_ran",workflow="declared_nodes"} 0.0'
        in text
    )


# -- no secrets ----------------------------------------------------------------------------


async def test_no_response_or_log_line_contains_a_token(
    db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(db) as (engine, client):
        caplog.set_level(logging.DEBUG)
        run_id = await engine.start("order", {"card": "bad"})
        await until(engine, run_id, durable.RunStatus.FAILED)
        texts: list[str] = []

        def keep(response: httpx.Response) -> None:
            texts.append(response.text)
            texts.extend(f"{k}: {v}" for k, v in response.headers.items())

        for headers in (BEARER, READ_BEARER, {}, {"authorization": "Bearer " + ADMIN[:-1]}):
            for path in [
                *GETS,
                f"/api/runs/{run_id}",
                "/runs",
                f"/runs/{run_id}",
                "/workflows",
                "/workers",
                "/login",
                f"/runs/{run_id}/confirm/fork",
            ]:
                keep(await client.get(path, headers=headers))
            keep(await client.post(f"/api/runs/{run_id}/retry", headers=headers))
        for token in (ADMIN, READ, "wrong-token-0123456789"):
            keep(await client.post("/login", data={"token": token, "next": "/durable/runs"}))
            keep(await client.get("/runs"))
            keep(await client.get(f"/runs/{run_id}"))
            client.cookies.clear()
        logged = [r.getMessage() + " " + repr(r.__dict__) for r in caplog.records]
        assert logged  # the engine did log (attempts, failures)
        for secret in (ADMIN, READ):
            assert not [t for t in texts if secret in t]
            assert not [line for line in logged if secret in line]
