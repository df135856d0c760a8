"""The operating surface: an ASGI admin app with a JSON API, a web dashboard and
Prometheus `/metrics`, for any engine (needs the `web` extra: `pip install durable-pg[web]`).

    from durable.web import admin_app
    app.mount("/durable", admin_app(engine, token=os.environ["DURABLE_ADMIN_TOKEN"]))
"""

from __future__ import annotations

from durable.web.app import admin_app

__all__ = ["admin_app"]
