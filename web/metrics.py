"""Prometheus metrics of one app (`GET /metrics`), in a registry of its own.

Requests are counted as they finish, labelled by the route's path template (never the raw path, which
carries ids). Tokens, the scheduler's queue, the loaded models, ingestion jobs and the index are read at
scrape time: the database counts in a worker thread, the rest on the event loop that owns it.
Who may scrape: a caller on loopback who sends no credentials (a local Prometheus or agent; requests a
proxy forwarded never count as local), or one whose key or session holds the `read_metrics` right (an admin).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func
from sqlmodel import select

from appliance import __version__
from appliance.db import Chunk, Document, Job, session
from web import sessions
from web.auth import bearer_token
from web.caller import caller

log = logging.getLogger(__name__)
router = APIRouter()

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
JOB_STATES = ("queued", "running", "done", "failed")
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


@dataclass
class DatabaseCounts:
    jobs: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    chunks: int = 0


def database_counts(engine) -> DatabaseCounts:
    with session(engine) as db:
        jobs = dict(db.exec(select(Job.state, func.count()).group_by(Job.state)).all())
        documents = db.exec(select(func.count()).select_from(Document)).one()
        chunks = db.exec(select(func.count()).select_from(Chunk)).one()
    return DatabaseCounts(jobs, documents, chunks)


class _LiveState:
    """A collector of what the app holds: the engine's token counts, the scheduler, the database's counts."""

    def __init__(self, state):
        self.state = state
        self.counts: DatabaseCounts | None = None  # set by `Metrics.render` just before the registry is read

    def collect(self):
        info = GaugeMetricFamily("appliance_info", "The appliance's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        engine = getattr(self.state, "engine", None)
        if engine is not None:
            for name, counts, text in (
                ("appliance_tokens_generated", engine.usage.generated, "Tokens generated, per model."),
                ("appliance_prompt_tokens", engine.usage.prompt, "Prompt tokens of generations, per model."),
            ):
                family = CounterMetricFamily(name, text, labels=["model"])
                for model, value in sorted(counts.items()):
                    family.add_metric([model], value)
                yield family
        scheduler = getattr(self.state, "scheduler", None)
        if scheduler is not None:
            yield GaugeMetricFamily(
                "appliance_queue_depth", "Requests waiting for a model runner.", value=scheduler.queued
            )
            yield GaugeMetricFamily(
                "appliance_requests_running", "Requests holding a sequence on a runner.", value=scheduler.running
            )
            loaded = scheduler.loaded()
            yield GaugeMetricFamily("appliance_loaded_models", "Model runners loaded.", value=len(loaded))
            model_info = GaugeMetricFamily(
                "appliance_loaded_model_info", "A loaded model runner (1).", labels=["model", "embedding"]
            )
            parallel = GaugeMetricFamily(
                "appliance_loaded_model_parallel_sequences",
                "Sequences a loaded runner decodes together.",
                labels=["model", "embedding"],
            )
            for model in loaded:
                labels = [model.slot[0], "true" if model.slot[1] else "false"]
                model_info.add_metric(labels, 1)
                parallel.add_metric(labels, model.n_parallel)
            yield model_info
            yield parallel
        if self.counts is not None:
            jobs = GaugeMetricFamily("appliance_ingest_jobs", "Ingestion jobs, by state.", labels=["state"])
            for state in sorted(set(JOB_STATES) | set(self.counts.jobs)):
                jobs.add_metric([state], self.counts.jobs.get(state, 0))
            yield jobs
            yield GaugeMetricFamily("appliance_index_documents", "Documents in the index.", value=self.counts.documents)
            yield GaugeMetricFamily("appliance_index_chunks", "Chunks in the index.", value=self.counts.chunks)


class Metrics:
    """The app's registry: request counters kept as requests finish, the rest collected at scrape time."""

    def __init__(self, state):
        disable_created_metrics()  # a `_created` series beside every counter doubles the output for nothing here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "appliance_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "appliance_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included), by route template.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.live = _LiveState(state)
        self.registry.register(self.live)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)

    def render(self, counts: DatabaseCounts | None) -> bytes:
        """The exposition text; call on the event loop (the scheduler's state is read unlocked)."""
        self.live.counts = counts
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request and counts it under its route template ("unmatched" when no route matched)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - started)


def _local_and_direct(request: Request) -> bool:
    """The caller is on this machine and no proxy forwarded the request."""
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _identified(request: Request) -> bool:
    if bearer_token(request):
        return True
    signed, _reason = sessions.current(request)
    return signed is not None and signed.row.stage == "full"


def authorize(request: Request) -> None:
    """Loopback callers who send no credentials may scrape; anyone who identifies needs `read_metrics`
    (the caller is read as an API caller: a key, or the browser session)."""
    if _local_and_direct(request) and not _identified(request):
        return
    caller(request).require("read_metrics", message="this operation requires the admin role")


@router.get("/metrics")
async def metrics(request: Request):
    authorize(request)
    state = request.app.state
    try:
        counts = await asyncio.to_thread(database_counts, state.db)
    except Exception as exc:  # the other metrics are still worth having when the database does not answer
        log.warning("metrics: the database counts failed: %s", exc)
        counts = None
    return Response(state.metrics.render(counts), media_type=CONTENT_TYPE_LATEST)
