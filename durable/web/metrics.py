"""`GET /metrics`: this process's counters (`durable.metrics`) and, read from the
database at each scrape, what every process shares: runs by workflow and status, due jobs
and the age of the oldest per queue, workers alive and their jobs in flight, limit use."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from durable.engine import Engine
from durable.web import data


class _Snapshot(Collector):
    """The database's view, read once per scrape."""

    def __init__(
        self, runs: list[Any], queues: list[Any], workers: list[Any], limits: list[Any]
    ) -> None:
        self.runs, self.queues, self.workers, self.limits = runs, queues, workers, limits

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily(
            "durable_runs",
            "Runs in the database by workflow and status",
            labels=["workflow", "status"],
        )
        for wf in self.runs:
            for status, n in wf["counts"].items():
                runs.add_metric([wf["name"], status], n)
        yield runs
        depth = GaugeMetricFamily(
            "durable_queue_depth", "Jobs due now and not leased, by queue", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "durable_oldest_due_job_age_seconds",
            "How long the oldest due job has been waiting, by queue",
            labels=["queue"],
        )
        for q in self.queues:
            depth.add_metric([q["queue"]], q["due"])
            oldest.add_metric([q["queue"]], max(q["oldest_age_seconds"], 0.0))
        yield depth
        yield oldest
        alive = [w for w in self.workers if w["alive"]]
        yield GaugeMetricFamily(
            "durable_workers_alive", "Workers with a recent heartbeat", value=len(alive)
        )
        in_flight = GaugeMetricFamily(
            "durable_worker_jobs_in_flight", "Jobs in flight per live worker", labels=["worker"]
        )
        for w in alive:
            in_flight.add_metric([w["name"]], w["in_flight"])
        yield in_flight
        limit_use = GaugeMetricFamily(
            "durable_limit_in_use", "Attempts in flight per named limit", labels=["limit"]
        )
        for limit in self.limits:
            limit_use.add_metric([limit["name"]], limit["in_flight"])
        yield limit_use


async def metrics_text(engine: Engine) -> bytes:
    """The Prometheus text exposition of this process and of the database."""
    registry = CollectorRegistry()
    registry.register(
        _Snapshot(
            await data.workflows(engine),
            await data.queues(engine),
            await data.workers(engine),
            await data.limits(engine),
        )
    )
    return generate_latest(REGISTRY) + generate_latest(registry)


async def metrics_endpoint(request: Request) -> Response:
    engine: Engine = await request.app.state.admin.engine()
    return Response(await metrics_text(engine), media_type=CONTENT_TYPE_LATEST)
