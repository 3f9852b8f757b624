"""The HTTP shell around the engine (FastAPI): request/response schemas, errors as JSON, auth,
metrics, server start-up. Every decision about batching lives in the engine.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

    POST   /v1/classify            classify one text (one prompt, an ensemble, or the bare model)
    POST   /v1/classify/batch      several classify requests at once
    POST   /v1/generate            generate (``"stream": true`` for server-sent events)
    POST   /v1/generate/batch      several generate requests at once
    GET    /v1/prompts             loaded prompts, and prompt files available in --prompts
    GET    /v1/prompts/{name}      one prompt
    PUT    /v1/prompts/{name}      upload a prompt file (raw bytes), replacing any of that name
    POST   /v1/prompts/{name}/load load (or reload) <name>.safetensors from --prompts
    DELETE /v1/prompts/{name}      unload
    GET    /healthz, /metrics

Errors are ``{"error": {"type": ..., "message": ...}}`` with the status from :data:`STATUS`.
"""

# No `from __future__ import annotations`: the routes' body types are built per server (schemas.py)
# and FastAPI must see them as objects, not names.

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, AsyncIterator

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import PromptFileError, SoftpromptError
from .bank import NAME_MAX, NAME_PATTERN, NAME_RE, SUFFIX
from .config import ServeConfig
from .engine import Engine, create_engine
from .jobs import ClassifyResult, GenerateResult, Job
from .errors import (
    BadPromptNameError, EngineStoppedError, InputTooLongError, InvalidRequestError, QueueFullError,
    RequestCancelledError, RequestError, RequestTimeoutError, RequestTooLargeError, UnknownPromptError,
    UploadTooLargeError, WrongTaskError,
)
from .limits import SEED_MAX, SEED_MIN, check_batch_size
from .schemas import (
    ClassifyBatchOut, ClassifyOut, ErrorOut, GenerateBatchOut, GenerateOut, HealthOut, PromptListOut, PromptOut,
    UnloadedOut, request_bodies, validation_error,
)

log = logging.getLogger(__name__)

STATUS: dict[type, tuple[int, str]] = {
    UnknownPromptError: (404, "unknown_prompt"),
    WrongTaskError: (422, "wrong_task"),
    InputTooLongError: (413, "input_too_long"),
    RequestTooLargeError: (413, "limit_exceeded"),
    BadPromptNameError: (400, "bad_prompt_name"),
    InvalidRequestError: (422, "invalid_request"),
    UploadTooLargeError: (413, "upload_too_large"),
    PromptFileError: (422, "invalid_prompt_file"),
    QueueFullError: (429, "queue_full"),
    RequestTimeoutError: (503, "timeout"),
    RequestCancelledError: (499, "cancelled"),
    EngineStoppedError: (503, "unavailable"),
    RequestError: (400, "request_failed"),
    SoftpromptError: (400, "bad_request"),
}
"""HTTP status and error type of each error class (the most specific class in the MRO wins).
499 (cancelled) is what the metrics record for a client that disconnected; it receives nothing."""


def status_of(error: BaseException) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal"


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def error_response(error: BaseException) -> JSONResponse:
    status, kind = status_of(error)
    message = str(error) if status != 500 else f"internal error ({type(error).__name__})"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


# ----------------------------------------------------------------------------- app


def classify_out(r: ClassifyResult) -> dict:
    return asdict(r)


def generate_out(r: GenerateResult) -> dict:
    return {"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.token_ids), "prompt": r.prompt}


def _errors(*codes: int) -> dict:
    """OpenAPI responses: each status with the error schema and what it means here."""
    what = {
        400: "Malformed JSON, or a prompt name that is not a plain file stem.",
        401: "Missing or wrong API key (only when the server has one).",
        404: "Unknown prompt.",
        413: "Request body over --max-upload-bytes, or a request over a limit (input, labels, scoring tokens, "
             "stop strings, requests per batch call); the message names the flag.",
        422: "An invalid field (type, range), a prompt of the wrong task, or an invalid prompt file.",
        429: "The queue is full (--max-queue); retry later (Retry-After).",
        503: "Not answered within --request-timeout, or the server is shutting down (Retry-After).",
    }
    return {c: {"model": ErrorOut, "description": what[c]} for c in codes}


SSE_EVENT = {
    "type": "object", "required": ["event", "data"],
    "description": "One server-sent event: `token` ({\"text\"}), then `done` (a GenerateOut) or `error` (an ErrorOut); "
                   "data is JSON.",
    "properties": {"event": {"type": "string", "enum": ["token", "done", "error"]},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
}
"""The schema of each event of a streamed generation."""

COMMON = (401, 413)
"""Statuses every route can answer (the guard in front of the app)."""


def build_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI app over a started ``engine`` (the caller starts and stops the engine)."""
    app = FastAPI(title="softprompt", version=__version__,
                  description="Many soft prompts on one frozen base model: mixed-task batching, cached prompt prefixes. "
                  "Every error is `{\"error\": {\"type\", \"message\"}}`.")
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_upload_bytes, metrics=engine.metrics)
    metrics = engine.metrics
    limits = config.engine
    timeout = limits.request_timeout
    bodies = request_bodies(limits)
    ClassifyBody, GenerateBody = bodies.classify, bodies.generate  # noqa: N806
    ClassifyBatchBody, GenerateBatchBody = bodies.classify_batch, bodies.generate_batch  # noqa: N806
    Name = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX, description="Prompt name (file stem).")]  # noqa: N806
    inference = _errors(*COMMON, 400, 404, 422, 429, 503)

    @app.exception_handler(SoftpromptError)
    async def on_user_error(request: Request, exc: SoftpromptError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        status, kind, message = validation_error(exc.errors(), limits)
        return JSONResponse(error_body(kind, message), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(exc)

    async def run_jobs(request: Request, jobs: list[Job]) -> list[Any]:
        """Queue jobs (all or none) and await their results without blocking the event loop. The
        engine ends every job by its deadline; a client that disconnects cancels its jobs."""
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            fut = loop.create_future()
            futures.append(fut)
            job.listener = _resolver(loop, fut)
        engine.enqueue(jobs)
        results = asyncio.ensure_future(asyncio.gather(*futures))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({results, gone}, timeout=timeout + 5, return_when=asyncio.FIRST_COMPLETED)
            if results in done:
                return results.result()
            if gone in done:  # the client went away: stop its work at the next step
                for job in jobs:
                    job.cancel(RequestCancelledError("the client disconnected"))
                raise RequestCancelledError("the client disconnected")
            error = RequestTimeoutError(f"no answer within --request-timeout {timeout} s")  # a safety net only
            for job in jobs:
                job.cancel(error)
            raise error
        finally:
            gone.cancel()
            if not results.done():
                results.cancel()
            for job in jobs:  # one request of a batch call failed: the call is answered, drop the rest
                if not job.done:
                    job.cancel(RequestCancelledError("another request of the same call failed"))

    def prepare(bodies, index: bool) -> list[Job]:
        if index:
            check_batch_size(len(bodies), limits)
        jobs = []
        for i, body in enumerate(bodies):
            try:
                jobs.append(engine.prepare(body.to_request()))
            except SoftpromptError as e:
                if index:
                    raise type(e)(f"requests[{i}]: {e}") from None
                raise
        return jobs

    @app.post("/v1/classify", response_model=ClassifyOut, tags=["inference"], responses=inference)
    async def classify(body: ClassifyBody, request: Request):
        """Classify one text; returns the label and class probabilities."""
        (result,) = await run_jobs(request, prepare([body], False))
        return classify_out(result)

    @app.post("/v1/classify/batch", response_model=ClassifyBatchOut, tags=["inference"], responses=inference)
    async def classify_batch(body: ClassifyBatchBody, request: Request):
        """Several classify requests (any prompts); results in request order."""
        results = await run_jobs(request, prepare(body.requests, True)) if body.requests else []
        return {"results": [classify_out(r) for r in results]}

    @app.post("/v1/generate", response_model=GenerateOut, tags=["inference"],
              responses={**inference, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                                            "description": "JSON, or server-sent events (event: token / done / error) "
                                            "when stream is true"}})
    async def generate(body: GenerateBody, request: Request):
        """Generate a continuation; with ``"stream": true`` tokens arrive as server-sent events."""
        (job,) = prepare([body], False)
        if not body.stream:
            (result,) = await run_jobs(request, [job])
            return generate_out(result)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.listener = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        engine.enqueue([job])  # a full queue is a plain 429, before any event is sent
        return StreamingResponse(_sse(job, events, timeout), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/generate/batch", response_model=GenerateBatchOut, tags=["inference"], responses=inference)
    async def generate_batch(body: GenerateBatchBody, request: Request):
        """Several generate requests (no streaming); results in request order."""
        if any(b.stream for b in body.requests):
            raise InvalidRequestError("streaming is not available in batch requests")
        results = await run_jobs(request, prepare(body.requests, True)) if body.requests else []
        return {"results": [generate_out(r) for r in results]}

    @app.get("/v1/prompts", response_model=PromptListOut, tags=["prompts"], responses=_errors(*COMMON))
    async def list_prompts():
        """Loaded prompts, and prompt files in --prompts that are not loaded."""
        loaded = [e.describe() for e in engine.bank.entries()]
        available = []
        if engine.bank.directory is not None:
            names = {e["name"] for e in loaded}
            available = sorted(n for p in engine.bank.directory.glob(f"*{SUFFIX}")
                               if NAME_RE.fullmatch(n := p.name[: -len(SUFFIX)]) and n not in names)
        return {"prompts": loaded, "available": available}

    @app.get("/v1/prompts/{name}", response_model=PromptOut, tags=["prompts"], responses=_errors(*COMMON, 400, 404))
    async def get_prompt(name: Name):
        return engine.bank.get(name).describe()

    @app.put("/v1/prompts/{name}", status_code=201, response_model=PromptOut, tags=["prompts"],
             responses=_errors(*COMMON, 400, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
    async def upload_prompt(name: Name, request: Request):
        """Upload a prompt file (the raw ``.safetensors`` bytes); replaces a prompt of that name.
        Kept in memory: copy the file into --prompts to keep it across restarts. Its labels must keep
        --max-labels and --max-label-tokens."""
        data = await request.body()  # at most --max-upload-bytes (checked by Guard)
        entry = await asyncio.to_thread(engine.bank.load_bytes, name, data, config.max_upload_bytes)
        return entry.describe()

    @app.post("/v1/prompts/{name}/load", response_model=PromptOut, tags=["prompts"],
              responses=_errors(*COMMON, 400, 404, 422))
    async def load_prompt(name: Name):
        """Load (or reload) ``<name>.safetensors`` from the prompts folder."""
        entry = await asyncio.to_thread(engine.bank.load_file, name)
        return entry.describe()

    @app.delete("/v1/prompts/{name}", response_model=UnloadedOut, tags=["prompts"], responses=_errors(*COMMON, 400, 404))
    async def unload_prompt(name: Name):
        """Unload a prompt; requests already accepted for it still complete."""
        engine.bank.unload(name)
        return {"unloaded": name}

    @app.get("/healthz", response_model=HealthOut, tags=["ops"],
             responses={**_errors(*COMMON), 503: {"model": HealthOut, "description": "The engine is not running."}})
    async def healthz():
        ok = engine.running
        body = {"status": "ok" if ok else "stopped", "model": engine.pm.base.name, "prompts": len(engine.bank),
                "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             responses={**_errors(*COMMON), 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                  "description": "Prometheus text exposition format."}})
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    schema_of = app.openapi

    def openapi() -> dict:
        """FastAPI's document, with two corrections: it adds a 422 with its own validation-error
        schema to every route with parameters (ours answer a bad path parameter with 400 and every
        error in ``ErrorOut``'s shape: the routes list their real statuses), and its OpenAPI model
        keeps bounds as floats (2**64 - 1 is no float: the seed's exact range is restored)."""
        if app.openapi_schema is None:
            doc = schema_of()
            for ops in doc["paths"].values():
                for op in ops.values():
                    schema = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
                    if schema.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        del op["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(name, None)
            seed = doc["components"]["schemas"]["GenerateBody"]["properties"]["seed"]["anyOf"][0]
            seed["minimum"], seed["maximum"] = SEED_MIN, SEED_MAX
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read already, so the next message is
    ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Guard:
    """ASGI middleware in front of every route: API key, body size limit, HTTP metrics.

    The body is read (up to ``max_body`` bytes) before the app sees it, so an oversized request
    is answered 413 whether or not it declares its length; a request without the key is refused
    before its body is read.
    """

    def __init__(self, app, api_key: str | None, max_body: int, metrics):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            body = b""
            if refusal is None:
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                return await refusal(scope, receive, send_status)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # e.g. http.disconnect while streaming

            await self.app(scope, replay, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http.labels(route, str(status["code"])).inc()
            self.metrics.http_latency.labels(route).observe(time.perf_counter() - t0)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.key):
                return JSONResponse(error_body("unauthorized", "missing or wrong API key (Authorization: Bearer KEY)"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large()
        return None

    async def _read_body(self, receive) -> tuple[bytes, JSONResponse | None]:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return b"", JSONResponse(error_body("disconnected", "client disconnected"), status_code=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", self._too_large()
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None

    def _too_large(self) -> JSONResponse:
        return JSONResponse(error_body("too_large", f"request body larger than --max-upload-bytes {self.max_body}"),
                            status_code=413)


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    """An engine listener that settles ``fut`` on the event loop (called from the worker thread)."""

    def settle(kind: str, payload) -> None:
        if fut.done():
            return
        if kind == "error":
            fut.set_exception(payload)
        else:
            fut.set_result(payload)

    def listener(kind: str, payload) -> None:
        if kind != "token":
            loop.call_soon_threadsafe(settle, kind, payload)

    return listener


def _sse_event(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _sse(job: Job, events: asyncio.Queue, timeout: float) -> AsyncIterator[str]:
    """Server-sent events for one queued generation: ``token`` events, then ``done`` or ``error``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout + 5  # a safety net: the engine ends the job at its deadline
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                job.cancel(RequestTimeoutError(f"no answer within --request-timeout {timeout} s"))
                yield _sse_event("error", error_body("timeout", f"no answer within --request-timeout {timeout} s"))
                return
            if kind == "token":
                yield _sse_event("token", {"text": payload})
            elif kind == "done":
                yield _sse_event("done", generate_out(payload))
                return
            else:
                status, k = status_of(payload)
                yield _sse_event("error", error_body(k, str(payload) if status != 500 else "internal error"))
                return
    finally:
        if not job.done:  # the client went away: its row leaves the batch at the next step
            job.cancel()


# ----------------------------------------------------------------------------- running


@dataclass
class RunningServer:
    """A server started by :func:`start_server`, serving in a background thread."""

    url: str
    engine: Engine
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.engine.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise SoftpromptError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: FastAPI, config: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=config.log_level in ("info", "debug", "trace"),
                                         timeout_graceful_shutdown=5))


def start_server(config: ServeConfig, engine: Engine | None = None, ready_timeout: float = 30.0) -> RunningServer:
    """Start the server in a background thread and return once it accepts connections.

    Args:
        config: settings; ``port=0`` picks a free port (see ``RunningServer.url``).
        engine: an engine to serve (started here if it is not); default: built from ``config``
            (loads the model and every prompt of ``config.prompts_dir``).
    """
    engine = engine or create_engine(config)
    engine.start()
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    server = _uvicorn_server(build_app(engine, config), config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="softprompt-http", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > ready_timeout:
            engine.stop()
            raise SoftpromptError(f"the server did not start on {config.host}:{port}")
        time.sleep(0.01)
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    return RunningServer(f"http://{host}:{port}", engine, server, thread)


def run_server(config: ServeConfig, engine: Engine | None = None, on_ready=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), in the calling thread.

    Args:
        on_ready: called with the base URL once the socket is bound and the model loaded.
    """
    engine = engine or create_engine(config)
    engine.start()
    try:
        sock = _bind(config.host, config.port)
        port = sock.getsockname()[1]
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        _uvicorn_server(build_app(engine, config), config).run(sockets=[sock])
    finally:
        engine.stop()
