"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), served by a
real uvicorn: log in, filter runs, open a run and see its timeline, cancel a waiting run,
retry a failed run, fork a run from a node with an edited input. Screenshots go to
tests/artifacts/dashboard/ (and to docs/images/ with DURABLE_DOCS_SCREENSHOTS=1, which is
how the pictures of docs/operating.md are made)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import durable
from tests.integration.helpers import eventually, running_engine

playwright_api = pytest.importorskip("playwright.async_api")
uvicorn = pytest.importorskip("uvicorn")

from durable.web import admin_app  # noqa: E402

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
DOCS_IMAGES = ROOT / "docs" / "images"
CHROMIUM = os.environ.get("DURABLE_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-admin-token-0123456789"

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

FLAKY = {"fail": True}


def shop() -> durable.Workflow:
    """reserve -> charge (fails while FLAKY says so, or for a bad card) -> approval -> ship."""
    wf = durable.Workflow("checkout")

    async def release(ctx: durable.Context) -> None:
        return None

    @wf.step(compensate=release)
    async def reserve(ctx: durable.Context) -> str:
        return f"reserved {ctx.input.get('sku', '?')}"

    @wf.step(max_attempts=2, backoff=lambda attempt: 0.05)
    async def charge(ctx: durable.Context) -> dict[str, Any]:
        if ctx.input.get("card") == "bad":
            raise durable.NonRetryable("card declined")
        if FLAKY["fail"] and ctx.input.get("card") == "flaky":
            raise RuntimeError("payment gateway timed out")
        return {"charged": ctx.input.get("amount", 10)}

    wf.wait_for_signal("approval", "approved")

    @wf.step
    async def ship(ctx: durable.Context) -> str:
        return "shipped"

    return wf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dashboard(dsn: str) -> Iterator[str]:
    """The admin app for `dsn` under a real uvicorn in a thread (its own event loop and its
    own engine); yields its base URL."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/durable", admin_app(dsn, token=TOKEN))])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/durable"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 860})
            page = await context.new_page()
            page.set_default_timeout(15_000)
            problems: list[str] = []
            page.on(
                "console",
                lambda m: problems.append(m.text) if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.problems = problems
            yield page
        finally:
            await browser.close()


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if os.environ.get("DURABLE_DOCS_SCREENSHOTS"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / f"dashboard-{name}.png")


async def until_status(engine: durable.Engine, run_id: str, status: str) -> None:
    async def reached() -> bool:
        return (await engine.get_run(run_id)).status.value == status

    await eventually(reached, timeout=15)


async def test_the_dashboard_in_chromium(db: Any) -> None:
    FLAKY["fail"] = True
    async with running_engine(db, shop()) as engine:
        done = await engine.start("checkout", {"sku": "A1", "card": "ok"})
        await until_status(engine, done, "waiting")
        await engine.signal(done, "approved", {"by": "ann"})
        waiting = await engine.start("checkout", {"sku": "B2", "card": "ok", "amount": 25})
        declined = await engine.start("checkout", {"sku": "C3", "card": "bad"})
        flaky = await engine.start("checkout", {"sku": "D4", "card": "flaky"})
        for run_id, status in (
            (done, "completed"),
            (waiting, "waiting"),
            (declined, "failed"),
            (flaky, "failed"),
        ):
            await until_status(engine, run_id, status)

        with dashboard(db.dsn) as url:
            async with browser_page() as page:
                # -- log in ------------------------------------------------------------
                response = await page.goto(f"{url}/runs")
                assert response.status == 401
                await shot(page, "login")
                await page.fill("input[name=token]", "not-the-token-0123456789")
                await page.click("button[type=submit]")
                await page.wait_for_selector("text=That token is not valid.")
                await page.fill("input[name=token]", TOKEN)
                await page.click("button[type=submit]")
                await page.wait_for_url(f"{url}/runs")
                for run_id in (done, waiting, declined, flaky):
                    await page.wait_for_selector(f"tr[data-run='{run_id}']")
                await shot(page, "runs")

                # -- the table refreshes itself (htmx) ---------------------------------
                fresh = await engine.start("checkout", {"sku": "E5", "card": "ok"})
                await page.wait_for_selector(f"tr[data-run='{fresh}']", timeout=10_000)

                # -- filter runs ---------------------------------------------------------
                await page.select_option("select[name=status]", "failed")
                await page.click("form.filters button[type=submit]")
                await page.wait_for_url("**status=failed**")
                rows = await page.locator("table.runs tbody tr").count()
                assert rows == 2
                assert await page.locator(f"tr[data-run='{declined}']").count() == 1
                assert await page.locator(f"tr[data-run='{waiting}']").count() == 0
                await shot(page, "runs-filtered")

                # -- open a run and see its timeline --------------------------------------
                await page.click(f"tr[data-run='{flaky}'] a")
                await page.wait_for_url(f"{url}/runs/{flaky}")
                await page.wait_for_selector("figure.timeline g.bar[data-key='reserve']")
                retried = page.locator("figure.timeline g.bar.o-retried[data-key='charge']")
                assert await retried.count() == 1
                assert await page.locator("g.bar.o-failed[data-key='charge']").count() == 1
                assert "payment gateway timed out" in await page.inner_text("table.events")
                await shot(page, "run-failed")

                # -- retry a failed run -------------------------------------------------
                FLAKY["fail"] = False
                await page.click("a.button:has-text('Retry')")
                await page.wait_for_url(f"{url}/runs/{flaky}/confirm/retry")
                await shot(page, "confirm-retry")
                await page.click("button:has-text('Yes, retry')")
                await page.wait_for_url(f"{url}/runs/{flaky}?flash=retried")
                await until_status(engine, flaky, "waiting")
                # the page refreshes itself until the run is waiting for its approval
                await page.wait_for_selector("#run-status .s-waiting", timeout=10_000)

                # -- cancel a waiting run ----------------------------------------------
                await page.goto(f"{url}/runs/{waiting}")
                await page.click("a.button:has-text('Cancel')")
                await page.wait_for_url(f"{url}/runs/{waiting}/confirm/cancel")
                await page.fill("input[name=reason]", "customer changed their mind")
                await shot(page, "confirm-cancel")
                await page.click("button:has-text('Yes, cancel')")
                await page.wait_for_url(f"{url}/runs/{waiting}?flash=cancelled")
                await until_status(engine, waiting, "cancelled")
                await page.wait_for_selector("#run-status .s-cancelled", timeout=10_000)
                run = await engine.get_run(waiting, journal=True)
                assert run.error == "customer changed their mind"
                assert "reserve@compensate" in [e.key for e in run.journal]
                await shot(page, "run-cancelled")

                # -- fork a run from a node with an edited input ---------------------------
                await page.goto(f"{url}/runs/{declined}")
                await page.click("a.button:has-text('Fork')")
                await page.wait_for_url(f"{url}/runs/{declined}/confirm/fork")
                assert await page.input_value("select[name=from_node]") == "charge"
                await page.fill("textarea[name=input]", '{"sku": "C3", "card": "ok", "amount": 99}')
                await shot(page, "confirm-fork")
                await page.click("button:has-text('Yes, fork')")
                await page.wait_for_url("**flash=forked")
                fork_id = page.url.split("/runs/")[1].split("?")[0]
                assert fork_id != declined
                await page.wait_for_selector("text=This run is a fork")
                await until_status(engine, fork_id, "waiting")
                fork = await engine.get_run(fork_id)
                assert fork.forked_from == declined
                assert fork.input["amount"] == 99
                assert fork.results["charge"] == {"charged": 99}
                await page.wait_for_selector("#run-status .s-waiting", timeout=10_000)
                await page.wait_for_selector(f"a[href$='/runs/{declined}']")
                await shot(page, "run-fork")

                # -- the completed run, workflows with their charts, workers ---------------
                await page.goto(f"{url}/runs/{done}")
                await page.wait_for_selector("g.bar[data-key='ship']")
                await shot(page, "run-completed")
                await page.goto(f"{url}/workflows")
                await page.wait_for_selector("#chart-throughput canvas")
                await page.wait_for_selector("#chart-failures canvas")
                await shot(page, "workflows")
                await page.goto(f"{url}/workers")
                await page.wait_for_selector("table.workers tbody tr.alive")
                await shot(page, "workers")

                # nothing the page did was refused by the Content-Security-Policy
                assert not [p for p in page.problems if "Content Security Policy" in p]
                assert not [p for p in page.problems if "Refused" in p]

        for run_id in (flaky, fork_id, fresh):
            await engine.cancel(run_id)


async def test_reading_works_with_javascript_off(db: Any) -> None:
    async with running_engine(db, shop()) as engine:
        run_id = await engine.start("checkout", {"sku": "A1", "card": "bad"})
        await until_status(engine, run_id, "failed")
        with dashboard(db.dsn) as url:
            async with playwright_api.async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    context = await browser.new_context(java_script_enabled=False)
                    page = await context.new_page()
                    await page.goto(f"{url}/runs")
                    await page.fill("input[name=token]", TOKEN)
                    await page.click("button[type=submit]")
                    await page.wait_for_url(f"{url}/runs")
                    await page.click(f"tr[data-run='{run_id}'] a")
                    await page.wait_for_selector("g.bar.o-failed[data-key='charge']")
                    assert "card declined" in await page.inner_text("main")
                finally:
                    await browser.close()
