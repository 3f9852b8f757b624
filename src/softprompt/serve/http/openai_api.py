"""The OpenAI-compatible API on the same app: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/completions``, ``POST /v1/chat/completions``.

A request's ``model`` names a loaded prompt (or the base model: no prompt). It becomes the same
engine job the native API queues (``Engine.prepare`` / ``enqueue``, through bridge.py), so the
limits, the queue and the answers are the native API's: a generation prompt generates, a
classification prompt answers its predicted label (and the label probabilities as ``logprobs``).
Errors on these routes take OpenAI's shape; the native routes keep theirs.

Not here: bodies, responses and the error shape (openai_schemas.py); the engine (serve/engine.py).
"""

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...tasks import labelled_kind, task
from ...version import __version__
from ..bank import PromptEntry
from ..config import EngineConfig, ServeConfig
from ..engine import Engine
from ..errors import RequestTimeoutError, UnknownPromptError
from ..jobs import ClassifyRequest, ClassifyResult, GenerateRequest, Job
from ..keys import Grant
from . import access
from .bridge import run_jobs
from .errors import http_exception_error
from .openai_schemas import (
    OPENAI_SSE, ChatCompletionOut, CompletionOut, FieldError, ModelCard, ModelList, OpenAIErrorOut, check_supported,
    chat_body, completion_body, is_openai_path, openai_error, openai_error_body, openai_validation_error,
)

log = logging.getLogger("softprompt.serve.app")

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
"""OpenAI's finish_reason of the engine's."""

FINGERPRINT = f"softprompt-{__version__}"


def documented(*codes: int) -> dict:
    """OpenAPI responses of an OpenAI route: each status with OpenAI's error schema."""
    what = {
        400: "An invalid or unsupported field (named in error.param), malformed JSON, or a chat request on a model "
             "without a chat template.",
        401: "Missing or wrong API key (only when the server has one).",
        404: "Unknown model, or one the API key may not use (error.code model_not_found).",
        413: "Request body over --max-upload-bytes, or a request over a limit; the message names the flag.",
        429: "The queue is full (--max-queue); retry later (Retry-After).",
        503: "Not answered within --request-timeout, or the server is shutting down (Retry-After).",
    }
    return {c: {"model": OpenAIErrorOut, "description": what[c]} for c in codes}


def mount_openai(app: FastAPI, engine: Engine, config: ServeConfig) -> None:
    """Add the OpenAI-compatible routes to ``app`` and answer their errors in OpenAI's shape (call
    after the native exception handlers are installed)."""
    created = int(time.time())
    _model_routes(app, engine, created)
    _completion_routes(app, engine, config.engine)
    _route_errors(app, config.engine)


# ----------------------------------------------------------------------------- models

def _cards(engine: Engine, created: int, grant: Grant) -> list[ModelCard]:
    """The base model and every loaded prompt ``grant`` may use."""
    base = engine.pm.base.name
    cards = [ModelCard(id=base, created=created, owned_by="softprompt", root=base, parent=None)]
    for e in engine.bank.entries():
        if e.name != base and grant.may_use(e.name):  # the base model's id wins over a prompt of the same name
            info = {"task": e.spec.kind, "length": e.length, "labels": e.spec.labels}
            cards.append(ModelCard(id=e.name, created=created, owned_by="softprompt", root=e.name, parent=base,
                                   softprompt=info))
    return cards


def _model_routes(app: FastAPI, engine: Engine, created: int) -> None:
    """GET /v1/models, /v1/models/{model}."""

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses=documented(401, 413))
    async def list_models(request: Request):
        """The base model and every loaded prompt (that the API key may use), as OpenAI models (a
        prompt's parent is the base)."""
        return ModelList(data=_cards(engine, created, access.grant_of(request)))

    @app.get("/v1/models/{model:path}", response_model=ModelCard, tags=["openai"],
             responses=documented(400, 401, 404, 413))
    async def get_model(request: Request, model: str = Path(min_length=1, max_length=1024, description="A model id.")):
        """One model: the base model or a loaded prompt."""
        for card in _cards(engine, created, access.grant_of(request)):
            if card.id == model:
                return card
        raise access.unknown_model(model)


# ----------------------------------------------------------------------------- completions

@dataclass(frozen=True)
class Flavour:
    """What differs between completions and chat: the object names and the shape of a choice."""

    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[str, str, dict | None], dict]
    """(text, finish_reason, logprobs) -> a choice of the whole response."""
    delta: Callable[[str | None, str | None, dict | None, bool], dict]
    """(text, finish_reason, logprobs, first) -> a choice of a streamed chunk."""


COMPLETION = Flavour(
    "text_completion", "text_completion", "cmpl-",
    lambda text, finish, lp: {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish},
    lambda text, finish, lp, first: {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish},
)
CHAT = Flavour(
    "chat.completion", "chat.completion.chunk", "chatcmpl-",
    lambda text, finish, lp: {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                              "finish_reason": finish},
    lambda text, finish, lp, first: {"index": 0, "delta": ({"role": "assistant"} if first else {})
                                     | ({"content": text} if text is not None else {}), "logprobs": lp,
                                     "finish_reason": finish},
)


@dataclass
class Call:
    """One OpenAI request on its way to the engine: what it asks for, in engine terms."""

    body: Any
    flavour: Flavour
    text: str  # the engine's input text (a chat rendered with the chat template)
    entry: PromptEntry | None  # None: the base model
    top_logprobs: int | None  # None: no logprobs asked

    @property
    def classify(self) -> bool:
        """A prompt of a labelled kind answers with its labels (a classify job); others generate."""
        return self.entry is not None and task(self.entry.spec.kind).labelled

    def head(self) -> dict:
        return {"id": self.flavour.id_prefix + uuid.uuid4().hex, "created": int(time.time()),
                "model": self.body.model, "system_fingerprint": FINGERPRINT}

    def info(self, probs: dict[str, float] | None = None) -> dict:
        return {"prompt": self.entry.name if self.entry else None, "task": self.entry.spec.kind if self.entry else labelled_kind(False).name,
                "virtual_tokens": self.entry.length if self.entry else 0, "probs": probs}

    def request(self, max_new: int | None) -> ClassifyRequest | GenerateRequest:
        b = self.body
        if self.classify:
            return ClassifyRequest(self.text, [self.entry.name])
        if self.top_logprobs is not None:
            raise FieldError("logprobs", "token log-probabilities are not available for generation (only the label "
                             "probabilities of a classification prompt)", "unsupported_field")
        stop = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
        return GenerateRequest(self.text, self.entry.name if self.entry else None, max_new,
                               1.0 if b.temperature is None else b.temperature, 1.0 if b.top_p is None else b.top_p,
                               b.seed, stop)


def resolve(engine: Engine, model: str, grant: Grant) -> PromptEntry | None:
    """The prompt a ``model`` names (None: the base model); 404 model_not_found if none, or if
    ``grant`` may not use it (the same answer)."""
    if model == engine.pm.base.name:
        return None
    if not grant.may_use(model):
        raise access.unknown_model(model)
    try:
        return engine.bank.get(model)
    except UnknownPromptError:
        raise access.unknown_model(model) from None


def render_chat(engine: Engine, messages: list, classify: bool) -> str:
    """The engine's input text of a chat: a classification prompt's one user message as it is,
    else the conversation in the tokenizer's chat template (the soft prompt goes in front)."""
    contents = [m.content if isinstance(m.content, str) else "".join(p.text for p in m.content) for m in messages]
    if classify:
        if len(messages) != 1 or messages[0].role != "user":
            raise FieldError("messages", "a classification prompt classifies one text: send one user message")
        return contents[0]
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise FieldError("model", f"the base model {engine.pm.base.name!r} has no chat template; use /v1/completions",
                         "no_chat_template")
    turns = [{"role": m.role, "content": c} for m, c in zip(messages, contents)]
    try:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template refuses the conversation (e.g. roles that do not alternate)
        raise FieldError("messages", f"the chat template refused the conversation ({e})") from None
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]  # the tokenizer puts it back when the input is encoded
    return text


def _completion_routes(app: FastAPI, engine: Engine, limits: EngineConfig) -> None:
    """POST /v1/completions, /v1/chat/completions."""
    base = engine.pm.base.name
    CompletionBody, ChatBody = completion_body(limits, base), chat_body(limits, base)  # noqa: N806
    ok = {"content": {"text/event-stream": {"schema": OPENAI_SSE}},
          "description": "JSON, or server-sent events when stream is true"}
    responses = {**documented(400, 401, 404, 413, 429, 503), 200: ok}

    @app.post("/v1/completions", response_model=CompletionOut, tags=["openai"], responses=responses)
    async def completions(body: CompletionBody, request: Request):
        """OpenAI completion: a generation prompt (or the base model) continues ``prompt``; a
        classification prompt answers its label."""
        check_supported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise FieldError("prompt", f"one prompt per request (got {len(prompts)})")
        entry = await asyncio.to_thread(resolve, engine, body.model, access.grant_of(request))  # may read its file
        call = Call(body, COMPLETION, prompts[0], entry, body.logprobs)
        return await answer(engine, request, call, body.max_tokens, limits)

    @app.post("/v1/chat/completions", response_model=ChatCompletionOut, tags=["openai"], responses=responses)
    async def chat_completions(body: ChatBody, request: Request):
        """OpenAI chat completion: the messages in the tokenizer's chat template behind the soft
        prompt; a classification prompt answers its label for one user message."""
        check_supported(body)
        entry = await asyncio.to_thread(resolve, engine, body.model, access.grant_of(request))  # may read its file
        if body.top_logprobs is not None and not body.logprobs:
            raise FieldError("top_logprobs", "only with logprobs: true")
        call = Call(body, CHAT, "", entry, (body.top_logprobs or 0) if body.logprobs else None)
        call.text = render_chat(engine, body.messages, call.classify)
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await answer(engine, request, call, max_new, limits)


# ----------------------------------------------------------------------------- answers

def label_logprobs(call: Call, result: ClassifyResult) -> dict | None:
    """A classification's label probabilities as OpenAI logprobs (log of each class probability,
    the top ``call.top_logprobs`` labels), or None when none were asked."""
    k = call.top_logprobs
    if k is None:
        return None
    lp = {label: math.log(p) if p > 0 else -1e30 for label, p in result.probs.items()}
    top = sorted(lp.items(), key=lambda x: -x[1])[:k]
    if call.flavour is COMPLETION:
        return {"tokens": [result.label], "token_logprobs": [lp[result.label]], "top_logprobs": [dict(top)],
                "text_offset": [0]}
    entry = lambda t, v: {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}  # noqa: E731
    return {"content": [entry(result.label, lp[result.label]) | {"top_logprobs": [entry(t, v) for t, v in top]}]}


def usage(job: Job, completion: int) -> dict:
    return {"prompt_tokens": job.tokens, "completion_tokens": completion, "total_tokens": job.tokens + completion}


async def answer(engine: Engine, request: Request, call: Call, max_new: int | None, limits: EngineConfig):
    """Queue the call's job and answer it: one JSON response, or server-sent events."""
    job = await asyncio.to_thread(engine.prepare, call.request(max_new))  # tokenizing: off the event loop
    head = call.head()
    stream = bool(call.body.stream)
    with_usage = stream and call.body.stream_options is not None and bool(call.body.stream_options.include_usage)
    if call.classify:  # answered at once: streamed as one chunk
        (result,) = await run_jobs(engine, request, [job], limits.request_timeout)
        label_index = job.labels.index(result.label)
        spent = usage(job, len(job.rows[0].label_ids[label_index]))
        text, finish, lp, info = result.label, "stop", label_logprobs(call, result), call.info(result.probs)
        if stream:
            chunks = [call.flavour.delta(text, None, lp, True), call.flavour.delta(None, finish, None, False)]
            return _sse(_events(call, head, chunks, spent if with_usage else None))
        return {**head, "object": call.flavour.object, "choices": [call.flavour.choice(text, finish, lp)],
                "usage": spent, "softprompt": info}
    if not stream:
        (result,) = await run_jobs(engine, request, [job], limits.request_timeout)
        return {**head, "object": call.flavour.object,
                "choices": [call.flavour.choice(result.text, FINISH[result.finish_reason], None)],
                "usage": usage(job, len(result.token_ids)), "softprompt": call.info()}
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.listener = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
    engine.enqueue([job])  # a full queue is a plain 429, before any event is sent
    return _sse(_generation_events(call, head, job, events, limits.request_timeout, with_usage))


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(call: Call, head: dict, choices: list[dict], spent: dict | None) -> AsyncIterator[str]:
    """The chunks of an answer known in full (a classification), then usage and ``[DONE]``."""
    for choice in choices:
        yield _data({**head, "object": call.flavour.chunk_object, "choices": [choice]})
    if spent is not None:
        yield _data({**head, "object": call.flavour.chunk_object, "choices": [], "usage": spent})
    yield _data("[DONE]")


async def _generation_events(call: Call, head: dict, job: Job, events: asyncio.Queue, timeout: float,
                             with_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks of a queued generation as its tokens arrive; an error after the first chunk
    is a ``data: {"error": ...}`` event (the status is sent already)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout + 5  # a safety net: the engine ends the job at its deadline
    chunk = lambda choice: _data({**head, "object": call.flavour.chunk_object, "choices": [choice]})  # noqa: E731
    first = call.flavour is CHAT
    if first:  # chat's first chunk carries the role
        yield chunk(call.flavour.delta("", None, None, True))
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                kind, payload = "error", RequestTimeoutError(f"no answer within --request-timeout {timeout} s")
                job.cancel(payload)
            if kind == "token":
                yield chunk(call.flavour.delta(payload, None, None, False))
            elif kind == "done":
                yield chunk(call.flavour.delta(None, FINISH[payload.finish_reason], None, False))
                if with_usage:
                    yield _data({**head, "object": call.flavour.chunk_object, "choices": [],
                                 "usage": usage(job, len(payload.token_ids))})
                yield _data("[DONE]")
                return
            else:
                yield _data(openai_error(payload, "")[1])
                return
    finally:
        if not job.done:  # the client went away: its row leaves the batch at the next step
            job.cancel()


# ----------------------------------------------------------------------------- errors

def _route_errors(app: FastAPI, limits: EngineConfig) -> None:
    """Wrap the app's exception handlers: on an OpenAI route, OpenAI's error shape; elsewhere the
    native handler, unchanged."""
    for cls, native in list(app.exception_handlers.items()):
        app.exception_handlers[cls] = _dispatch(native, limits)


def _dispatch(native: Callable, limits: EngineConfig) -> Callable:
    """An exception handler: OpenAI's error shape on the OpenAI routes, ``native`` elsewhere."""

    async def handler(request: Request, exc: Exception) -> Response:
        path = request.url.path
        if not is_openai_path(path):
            return await native(request, exc)
        headers = None
        if isinstance(exc, RequestValidationError):
            status, code, message, param = openai_validation_error(exc.errors(), limits)
            body = openai_error_body(status, code, message, param)
        elif isinstance(exc, StarletteHTTPException):
            status, code, message = http_exception_error(exc)
            body = openai_error_body(status, code, message)
        else:
            status, body = openai_error(exc, path)
            if status == 500:
                log.error("internal error on %s", path, exc_info=exc)
            headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)

    return handler
