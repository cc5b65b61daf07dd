"""`create_app(settings)`: the core of the home (`appliance.services.Services`) behind FastAPI.

Heavy things start in the lifespan. Domain errors are translated here, once: Ollama's
`{"error": "..."}` under /api and elsewhere, OpenAI's error object under /v1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from appliance import __version__
from appliance.config import RetrievalSettings, Settings
from appliance.errors import ApplianceError, Forbidden, Withheld
from appliance.retrieval.retrieve import Retriever
from appliance.services import Services
from ingest.jobs import JobWorker
from web import (
    admin_pages,
    documents_api,
    health,
    metrics,
    oidc,
    ollama_api,
    openai_api,
    pages,
    rag_api,
    sessions,
    signin,
)
from web.auth import host_allowed, host_name, issue_cli_token
from web.rate_limits import RateLimits
from web.rendering import SignInRequired, error_page, is_page
from web.security import CsrfRefused, add_security_headers, audit, audit_refusal

log = logging.getLogger(__name__)


def _error_response(request: Request, status: int, message: str, headers: dict | None = None) -> Response:
    if is_page(request):
        return error_page(request, status, message)
    if request.url.path.startswith("/v1"):
        return JSONResponse(openai_api.error_body(message, status), status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _read_index_copies(retriever: Retriever, settings: RetrievalSettings) -> None:
    """Build the in-memory copies the searches use now, not on the first question (~2 s + ~6 s at 100k chunks)."""
    if settings.vector_search == "memory":
        copied = retriever.index.backfill_vectors()
        if copied:
            log.info("copied %d vectors indexed by an older version from Chroma into the database", copied)
        retriever.mirror.current()
    if settings.keyword_search == "memory":
        retriever.keywords.current()


def _log_failure(what: str):
    """A done-callback for a background task: its failure is logged, not lost (the next query retries)."""

    def check(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %s", what, task.exception())

    return check


def _remove_server_url(settings: Settings) -> None:
    """Remove the run directory's server.url, unless another server of this home has written its own since."""
    path = settings.server_url_file
    if path.is_file() and path.read_text().strip() == settings.server.local_url:
        path.unlink(missing_ok=True)


def _refused_host(request: Request, settings: Settings) -> Response:
    """403 for a Host header the server does not answer to, saying how to allow it."""
    name = host_name(request.headers.get("host", ""))[:200]
    allowed = json.dumps([*settings.server.allowed_hosts, name])
    message = (
        f"forbidden host header: this server does not answer to {name!r}; to accept it, set "
        f"APPLIANCE_ALLOWED_HOSTS='{allowed}' (deploy/README.md, 'Host names')"
    )
    return _error_response(request, 403, message)


class HeadAsGet:
    """HEAD on every GET route, as HTTP asks and Ollama does on /, /api/version and /api/tags: the GET route runs
    (authentication, limits and all) and its body is dropped. Routes that declare HEAD keep their own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD" or not _get_only(scope):
            await self.app(scope, receive, send)
            return

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _get_only(scope) -> bool:
    """Whether no route takes HEAD at this path and one takes GET."""
    routes = scope["app"].router.routes
    if any(route.matches(scope)[0] is Match.FULL for route in routes):
        return False
    as_get = {**scope, "method": "GET"}
    return any(route.matches(as_get)[0] is Match.FULL for route in routes)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = Services(settings)
        state = app.state
        state.settings = settings
        state.services = services
        state.db = services.db
        # Everything is built now, the slow parts off the event loop; routes read it from app.state.
        state.store = await asyncio.to_thread(getattr, services, "store")
        state.hardware = await asyncio.to_thread(getattr, services, "hardware")
        state.scheduler = services.scheduler
        state.vectors = await asyncio.to_thread(getattr, services, "vectors")
        try:  # 'auto' resolved against the index; a named backend whose vectors differ is refused
            state.embedder = await asyncio.to_thread(getattr, services, "embedder")
        except ApplianceError as exc:
            log.error("cannot start: %s", exc.message)
            raise
        state.engine = services.engine
        state.ingestor = services.ingestor
        state.retriever = services.retriever
        state.answerer = services.answerer
        state.jobs = JobWorker(state.db, state.ingestor, settings.home / "incoming")
        await asyncio.to_thread(state.jobs.recover)
        worker = asyncio.create_task(state.jobs.run_forever())
        state.cli_token_hash = issue_cli_token(settings.run_dir)
        settings.server_url_file.write_text(settings.server.local_url + "\n")  # where the local CLI finds us
        state.form_key = secrets.token_bytes(32)  # signs the sign-in forms' CSRF tokens (per process)
        state.oidc = oidc.Provider(settings.oidc) if settings.oidc.enabled else None  # read on first use
        state.started_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        warm = asyncio.create_task(state.embedder.aload())
        warm_copies = asyncio.create_task(asyncio.to_thread(_read_index_copies, state.retriever, settings.retrieval))
        warm_copies.add_done_callback(_log_failure("reading the in-memory index copies"))
        warm_answers = asyncio.create_task(state.answerer.warm())
        warm_answers.add_done_callback(_log_failure("loading the model that writes answers"))
        log.info(
            "appliance %s ready: %d CPU cores, %.1f GiB memory, %d GPU(s)",
            __version__,
            state.hardware.physical_cores,
            state.hardware.total_memory / 2**30,
            len(state.hardware.gpu_free_memory),
        )
        try:
            yield
        finally:
            warm.cancel()
            warm_answers.cancel()
            worker.cancel()
            await services.aclose()
            (settings.run_dir / "cli.token").unlink(missing_ok=True)
            _remove_server_url(settings)

    app = FastAPI(
        title="Knowledge appliance",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.rate_limits = RateLimits(settings.server.api_rate_limit)  # a bad setting stops the start here

    app.add_middleware(HeadAsGet)  # added first, so innermost: the Host check and metrics see the HEAD

    @app.middleware("http")
    async def check_host(request: Request, call_next):
        host = request.headers.get("host", "")
        if not host_allowed(host, settings.server.host, settings.server.allowed_hosts):
            response = _refused_host(request, settings)
        else:
            response = await call_next(request)
        add_security_headers(response, request.url.path)
        return response

    # Added last, so outermost: it also times and counts what the Host check refuses.
    app.state.metrics = metrics.Metrics(app.state)
    app.add_middleware(metrics.MetricsMiddleware, metrics=app.state.metrics)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired):
        return RedirectResponse(exc.location, status_code=303)

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused):
        signed, _ = sessions.current(request)
        actor, actor_id = (signed.user.name, signed.user.id) if signed is not None else ("-", None)
        audit(request, actor, "csrf_refused", actor_id=actor_id, outcome="denied", path=request.url.path[:200])
        return _error_response(request, exc.status, exc.message)

    @app.exception_handler(ApplianceError)
    async def appliance_error(request: Request, exc: ApplianceError):
        if isinstance(exc, Forbidden | Withheld):
            audit_refusal(request, exc)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return _error_response(request, exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return _error_response(request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(request, 400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(request, 500, "internal server error")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root(request: Request):
        """A browser gets the ask page (or the sign-in); programs get Ollama's answer."""
        if request.method == "GET" and is_page(request):
            return await pages.ask_page(request)
        return PlainTextResponse("Ollama is running")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(ollama_api.router)
    app.include_router(openai_api.router)
    app.include_router(documents_api.router)
    app.include_router(rag_api.router)
    app.include_router(signin.router)
    app.include_router(oidc.router)
    app.include_router(pages.router)
    app.include_router(admin_pages.router)
    return app
