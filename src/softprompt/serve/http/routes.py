"""The HTTP routes over the engine (FastAPI). Every decision about batching lives in the engine;
request/response schemas are schemas.py, errors errors.py, the guard guard.py, SSE bridge.py.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

    POST   /v1/classify            classify one text (one prompt, an ensemble, or the bare model)
    POST   /v1/classify/batch      several classify requests at once
    POST   /v1/generate            generate (``"stream": true`` for server-sent events)
    POST   /v1/generate/batch      several generate requests at once
    GET    /v1/prompts             loaded prompts, and prompt files available in --prompts
    GET    /v1/prompts/{name}      one prompt (a name may hold a namespace: acme/ticket-routing)
    PUT    /v1/prompts/{name}      upload a prompt file (raw bytes), replacing any of that name
    POST   /v1/prompts/{name}/load load (or reload) <name>.safetensors from --prompts
    DELETE /v1/prompts/{name}      unload
    GET    /healthz, /metrics

OpenAI-compatible (openai_api.py; errors in OpenAI's shape there):

    GET    /v1/models, /v1/models/{model}      the base model and every loaded prompt
    POST   /v1/completions, /v1/chat/completions

Errors are ``{"error": {"type": ..., "message": ...}}`` with the status from :data:`STATUS`.
With scoped keys (``--api-keys``) each route shows a key only its namespaces' prompts (access.py).
"""

# No `from __future__ import annotations`: the routes' body types are built per server (schemas.py)
# and FastAPI must see them as objects, not names.

import asyncio
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ...version import __version__
from ...errors import SoftpromptError
from ..config import EngineConfig, ServeConfig
from ..engine import Engine
from ..errors import InvalidRequestError, UnknownPromptError
from ..jobs import Job
from ..keys import KeyRing, key_ring
from ..store import LIST_MAX, PROMPT_MAX, PROMPT_PATTERN, listing_page
from ..limits import SEED_MAX, SEED_MIN, check_batch_size
from ..schemas import (
    ClassifyBatchOut, ClassifyOut, GenerateBatchOut, GenerateOut, HealthOut, PromptListOut, PromptOut, UnloadedOut,
    request_bodies,
)
from . import access
from .bridge import SSE_EVENT, classify_out, generate_out, run_jobs, sse
from .errors import COMMON, documented, install_handlers
from .guard import Guard
from .openai_api import mount_openai


def build_app(engine: Engine, config: ServeConfig, keys: KeyRing | None = None) -> FastAPI:
    """The FastAPI app over a started ``engine`` (the caller starts and stops the engine).

    Args:
        keys: the keys it accepts (default: ``config``'s ``--api-key`` and ``--api-keys``); kept
            as ``app.state.keys`` (None: no keys, every request may do everything).
    """
    keys = keys or key_ring(config.api_key, config.api_keys)
    app = FastAPI(title="softprompt", version=__version__,
                  description="Many soft prompts on one frozen base model: mixed-task batching, cached prompt prefixes. "
                  "Every error is `{\"error\": {\"type\", \"message\"}}`.",
                  dependencies=[Depends(access.path_access(engine.bank, engine.pm.base.name))])
    app.state.keys = keys
    app.add_middleware(Guard, keys=keys, max_body=config.max_upload_bytes, metrics=engine.metrics)
    install_handlers(app, config.engine)
    _inference_routes(app, engine, config)
    _prompt_routes(app, engine, config)
    _ops_routes(app, engine)
    mount_openai(app, engine, config)  # /v1/models, /v1/completions, /v1/chat/completions
    access.hide_unknown_prompts(app)
    _fix_openapi(app)
    return app


async def prepare(engine: Engine, limits: EngineConfig, bodies, index: bool, request: Request) -> list[Job]:
    """Request bodies -> jobs (not queued), off the event loop: a prompt that is not resident is
    read from its file here, and tokenizing a long text takes time too. A batch call names the
    failing request's index. Every prompt named must be one the request's key may use."""
    return await asyncio.to_thread(_prepare, engine, limits, bodies, index, request)


def _prepare(engine: Engine, limits: EngineConfig, bodies, index: bool, request: Request) -> list[Job]:
    if index:
        check_batch_size(len(bodies), limits)
    jobs = []
    for i, body in enumerate(bodies):
        try:
            job_request = body.to_request()
            access.check_use(request, engine.bank, access.prompts_of(job_request))
            jobs.append(engine.prepare(job_request))
        except SoftpromptError as e:
            if index:
                raise type(e)(f"requests[{i}]: {e}") from None
            raise
    return jobs


def _inference_routes(app: FastAPI, engine: Engine, config: ServeConfig) -> None:
    """POST /v1/classify, /v1/classify/batch, /v1/generate (optionally streamed), /v1/generate/batch."""
    limits = config.engine
    timeout = limits.request_timeout
    bodies = request_bodies(limits)
    ClassifyBody, GenerateBody = bodies.classify, bodies.generate  # noqa: N806
    ClassifyBatchBody, GenerateBatchBody = bodies.classify_batch, bodies.generate_batch  # noqa: N806
    inference = documented(*COMMON, 400, 404, 422, 429, 503)

    @app.post("/v1/classify", response_model=ClassifyOut, tags=["inference"], responses=inference)
    async def classify(body: ClassifyBody, request: Request):
        """Classify one text; returns the label and class probabilities."""
        (result,) = await run_jobs(engine, request, await prepare(engine, limits, [body], False, request), timeout)
        return classify_out(result)

    @app.post("/v1/classify/batch", response_model=ClassifyBatchOut, tags=["inference"], responses=inference)
    async def classify_batch(body: ClassifyBatchBody, request: Request):
        """Several classify requests (any prompts); results in request order."""
        if not body.requests:
            return {"results": []}
        results = await run_jobs(engine, request, await prepare(engine, limits, body.requests, True, request), timeout)
        return {"results": [classify_out(r) for r in results]}

    @app.post("/v1/generate", response_model=GenerateOut, tags=["inference"],
              responses={**inference, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                                            "description": "JSON, or server-sent events (event: token / done / error) "
                                            "when stream is true"}})
    async def generate(body: GenerateBody, request: Request):
        """Generate a continuation; with ``"stream": true`` tokens arrive as server-sent events."""
        (job,) = await prepare(engine, limits, [body], False, request)
        if not body.stream:
            (result,) = await run_jobs(engine, request, [job], timeout)
            return generate_out(result)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.listener = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        engine.enqueue([job])  # a full queue is a plain 429, before any event is sent
        return StreamingResponse(sse(job, events, timeout), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/generate/batch", response_model=GenerateBatchOut, tags=["inference"], responses=inference)
    async def generate_batch(body: GenerateBatchBody, request: Request):
        """Several generate requests (no streaming); results in request order."""
        if any(b.stream for b in body.requests):
            raise InvalidRequestError("streaming is not available in batch requests")
        if not body.requests:
            return {"results": []}
        results = await run_jobs(engine, request, await prepare(engine, limits, body.requests, True, request), timeout)
        return {"results": [generate_out(r) for r in results]}


def _prompt_routes(app: FastAPI, engine: Engine, config: ServeConfig) -> None:
    """GET/PUT/DELETE /v1/prompts/{name}, POST /v1/prompts/{name}/load, GET /v1/prompts."""
    Name = Annotated[str, Path(pattern=PROMPT_PATTERN, max_length=PROMPT_MAX,  # noqa: N806
                               description="Prompt name (file stem), optionally in a namespace: acme/ticket-routing.")]

    @app.get("/v1/prompts", response_model=PromptListOut, tags=["prompts"], responses=documented(*COMMON, 422))
    async def list_prompts(
        request: Request,
        namespace: Annotated[str | None, Query(pattern=PROMPT_PATTERN, max_length=PROMPT_MAX,
                                               description="Only the prompts under this namespace (any depth): acme.")] = None,
        after: Annotated[str | None, Query(max_length=PROMPT_MAX,
                                           description="Names after this one: the `next` of the previous page.")] = None,
        limit: Annotated[int | None, Query(ge=1, le=LIST_MAX, description="At most this many names (default: all).")] = None,
    ):
        """Loaded prompts, and prompt files in --prompts that are not loaded (those the API key may
        use), in name order; with ``limit``, one page of them and the ``next`` page's cursor."""
        grant = access.grant_of(request)
        loaded = {e.name: e for e in engine.bank.entries() if grant.may_use(e.name)}
        available = [n for n in engine.bank.available() if grant.may_use(n)]
        page, cursor = listing_page([*loaded, *available], namespace, after, limit)
        return {"prompts": [loaded[n].describe() for n in page if n in loaded],
                "available": [n for n in page if n not in loaded], "next": cursor}

    @app.get("/v1/prompts/{name:path}", response_model=PromptOut, tags=["prompts"],
             responses=documented(*COMMON, 400, 404))
    async def get_prompt(name: Name, request: Request):
        access.check_use(request, engine.bank, [name])
        return engine.bank.get(name).describe()

    @app.put("/v1/prompts/{name:path}", status_code=201, response_model=PromptOut, tags=["prompts"],
             responses=documented(*COMMON, 400, 403, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
    async def upload_prompt(name: Name, request: Request):
        """Upload a prompt file (the raw ``.safetensors`` bytes); replaces a prompt of that name.
        Written to --prompts (atomically, fsynced) so it survives restarts; in memory only with
        --ephemeral-uploads or without --prompts. Its labels must keep --max-labels and --max-label-tokens."""
        data = await request.body()  # at most --max-upload-bytes (checked by Guard)
        entry = await asyncio.to_thread(engine.bank.load_bytes, name, data, config.max_upload_bytes)
        return entry.describe()

    @app.post("/v1/prompts/{name:path}/load", response_model=PromptOut, tags=["prompts"],
              responses=documented(*COMMON, 400, 403, 404, 422))
    async def load_prompt(name: Name):
        """Load (or reload) ``<name>.safetensors`` from the prompts folder."""
        try:
            entry = await asyncio.to_thread(engine.bank.load_file, name)
        except UnknownPromptError as e:  # no such file: the message names only this name's file
            raise access.HiddenPromptError(str(e)) from None
        return entry.describe()

    @app.delete("/v1/prompts/{name:path}", response_model=UnloadedOut, tags=["prompts"],
                responses=documented(*COMMON, 400, 403, 404))
    async def unload_prompt(name: Name, request: Request):
        """Unload a prompt; requests already accepted for it still complete."""
        access.check_use(request, engine.bank, [name])
        engine.bank.unload(name)
        return {"unloaded": name}


def _ops_routes(app: FastAPI, engine: Engine) -> None:
    """GET /healthz, /metrics."""
    metrics = engine.metrics

    @app.get("/healthz", response_model=HealthOut, tags=["ops"],
             responses={**documented(*COMMON), 503: {"model": HealthOut, "description": "The engine is not running."}})
    async def healthz(request: Request):
        ok = engine.running
        grant = access.grant_of(request)
        prompts = len(engine.bank) if grant.admin else len(access.usable(grant, engine.bank.names()))
        body = {"status": "ok" if ok else "stopped", "model": engine.pm.base.name, "prompts": prompts,
                "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=[Depends(access.admin_only)],
             responses={**documented(*COMMON, 403), 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                  "description": "Prometheus text exposition format."}})
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _fix_openapi(app: FastAPI) -> None:
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
            for body in doc["components"]["schemas"].values():  # GenerateBody, the OpenAI bodies
                if "anyOf" in body.get("properties", {}).get("seed", {}):
                    seed = body["properties"]["seed"]["anyOf"][0]
                    seed["minimum"], seed["maximum"] = SEED_MIN, SEED_MAX
        return app.openapi_schema

    app.openapi = openapi
