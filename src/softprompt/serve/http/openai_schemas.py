"""The OpenAI-compatible API's request bodies, responses and errors (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``): bodies built from the server's limits like the
native ones (schemas.py), so the OpenAPI document states them; errors in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Not here: the routes and the translation to engine jobs (openai_api.py); the native API's schemas
(serve/schemas.py), whose limit messages these reuse.
"""

# No `from __future__ import annotations`: the bodies are built per server and pydantic/FastAPI
# must see their field types as objects.

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..config import EngineConfig
from ..errors import InputTooLongError, InvalidRequestError, UnknownPromptError
from ..limits import CHARS_PER_TOKEN_LIMIT, SEED_MAX, SEED_MIN
from ..schemas import validation_error
from ...tasks import TaskKind
from .errors import status_of

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def is_openai_path(path: str) -> bool:
    """Whether ``path`` belongs to the OpenAI-compatible API (its errors take OpenAI's shape)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


# ----------------------------------------------------------------------------- errors

class FieldError(InvalidRequestError):
    """A request field this server refuses or cannot honour: 400, naming the field in ``param``."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code


ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
"""OpenAI's error ``type`` by status; any other status is an ``invalid_request_error``."""


def openai_error_body(status: int, code: str | None, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def openai_error(error: BaseException, path: str) -> tuple[int, dict]:
    """(status, body) of an error on an OpenAI route: the native API's status (422 becomes 400, as
    OpenAI answers an invalid field), the native error type as ``code``, the field as ``param``."""
    status, code = status_of(error)
    message = str(error) if status != 500 else f"internal error ({type(error).__name__})"
    param = getattr(error, "param", None)
    code = getattr(error, "code", code)
    if isinstance(error, UnknownPromptError):
        param, code = "model", "model_not_found"
    elif isinstance(error, InputTooLongError) and param is None:
        param = "messages" if path.endswith("/chat/completions") else "prompt"
    status = 400 if status == 422 else status
    return status, openai_error_body(status, code, message, param)


FLAGS = {"prompt": "--max-input-tokens", "messages": "--max-input-tokens", "max_tokens": "--max-new-tokens",
         "max_completion_tokens": "--max-new-tokens"}
"""The flag behind the bounds of OpenAI fields the native schemas do not have."""


def openai_validation_error(errors: list[dict], limits: EngineConfig) -> tuple[int, str, str, str | None]:
    """(status, code, message, param) of a schema violation: the native API's message and status
    (413 for a string or list over a limit), 400 for any other invalid or unsupported field."""
    status, code, message = validation_error(errors, limits)
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0]) if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    param = str(loc[0]) if loc and first.get("loc", ("",))[0] in ("body", "path") else None
    kind = str(first.get("type", ""))
    if kind == "extra_forbidden":
        where = ".".join(str(x) for x in loc)
        return 400, "unsupported_field", f"{where}: not supported by this server (see the OpenAI API guide's field table)", param
    if param in FLAGS and "(--" not in message and kind in ("too_long", "string_too_long", "less_than_equal"):
        flag = FLAGS[param]
        message += f" ({flag} {limits.max_input_tokens if flag == '--max-input-tokens' else limits.max_new_tokens})"
        if kind != "less_than_equal":
            status, code = 413, "limit_exceeded"
    return (400 if status == 422 else status), code, message, param


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="One line naming the problem (the field, or the flag of a limit).")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="Machine-readable kind: model_not_found, unsupported_field, "
                             "input_too_long, queue_full, ... (the native API's error types).")


class OpenAIErrorOut(BaseModel):
    """Every error of the OpenAI-compatible routes: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIErrorDetail


# ----------------------------------------------------------------------------- request bodies

NO_OP: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},),
}
"""Fields accepted only with the value that changes nothing (clients send them as defaults);
any other value is a 400 naming the field."""


def check_supported(body: BaseModel) -> None:
    """Refuse a field this server cannot honour (400 naming it)."""
    for name, allowed in NO_OP.items():
        value = getattr(body, name, None)
        if value is not None and value not in allowed:
            raise FieldError(name, f"only {allowed[0]!r} is supported by this server", "unsupported_field")
    if body.stream_options is not None and not body.stream:
        raise FieldError("stream_options", "only with stream: true")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = Field(None, description="A last chunk with the usage (and no choices).")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


def _common(limits: EngineConfig, base: str) -> dict[str, Any]:
    """The fields completions and chat share (``base``: the base model's id, the example model)."""
    Stop = Annotated[str, Field(min_length=1, max_length=limits.max_stop_chars)]  # noqa: N806
    refused = "Accepted only as {} (the default); anything else is a 400."
    return dict(
        model=(str, Field(min_length=1, max_length=1024, examples=[base], description="A loaded prompt's name, or "
                          "the base model's id (no prompt); see GET /v1/models.")),
        temperature=(float | None, Field(None, ge=0, le=100, description="Default 1 (as OpenAI); 0 = greedy.")),
        top_p=(float | None, Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")),
        stop=(Stop | Annotated[list[Stop], Field(max_length=limits.max_stop)] | None, Field(
            None, description="Strings that end the generation (at most --max-stop, each at most --max-stop-chars).")),
        seed=(int | None, Field(None, ge=SEED_MIN, le=SEED_MAX, description="Sampling seed (same seed, same tokens).")),
        n=(int | None, Field(None, ge=1, description=refused.format(1))),
        stream=(bool | None, Field(None, description="Stream chunks as server-sent events, then `data: [DONE]`.")),
        stream_options=(StreamOptions | None, Field(None)),
        presence_penalty=(float | None, Field(None, description=refused.format(0))),
        frequency_penalty=(float | None, Field(None, description=refused.format(0))),
        logit_bias=(dict[str, float] | None, Field(None, description=refused.format("{}"))),
        user=(str | None, Field(None, max_length=256, description="Accepted and ignored.")),
    )


def completion_body(limits: EngineConfig, base: str) -> type[BaseModel]:
    """``POST /v1/completions``'s body, with ``limits`` in its schema."""
    Text = Annotated[str, Field(max_length=CHARS_PER_TOKEN_LIMIT * limits.max_input_tokens)]  # noqa: N806
    return create_model(
        "CompletionBody", __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="An OpenAI completion request; fields not listed are refused (400 naming the field).",
        **_common(limits, base),
        prompt=(Text | list[Text], Field(description="The input (a list of one string is accepted too).")),
        max_tokens=(int | None, Field(None, ge=1, le=limits.max_new_tokens, description=f"Most tokens to "
                                      f"generate (default {limits.default_new_tokens}, at most --max-new-tokens).")),
        logprobs=(int | None, Field(None, ge=0, le=20, description="Classification prompts only: the label "
                                    "probabilities, top k of them.")),
        echo=(bool | None, Field(None, description="Accepted only as false.")),
        suffix=(str | None, Field(None, description="Accepted only as empty.")),
        best_of=(int | None, Field(None, ge=1, description="Accepted only as 1.")),
    )


def chat_body(limits: EngineConfig, base: str) -> type[BaseModel]:
    """``POST /v1/chat/completions``'s body, with ``limits`` in its schema."""
    Text = Annotated[str, Field(max_length=CHARS_PER_TOKEN_LIMIT * limits.max_input_tokens)]  # noqa: N806
    message = create_model(
        "ChatMessage", __config__=ConfigDict(extra="forbid", strict=True),
        role=(Literal["system", "developer", "user", "assistant"], ...),
        content=(Text | list[TextPart], Field(description="Text, or a list of text parts.")),
        name=(str | None, Field(None, max_length=256)),
    )
    tokens = Field(None, ge=1, le=limits.max_new_tokens, description=f"Most tokens to generate (default "
                   f"{limits.default_new_tokens}, at most --max-new-tokens); max_completion_tokens wins.")
    return create_model(
        "ChatCompletionBody", __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="An OpenAI chat completion request; fields not listed are refused (400 naming the field).",
        **_common(limits, base),
        messages=(Annotated[list[message], Field(min_length=1)], Field(description="The conversation, rendered "
                  "with the tokenizer's chat template; a classification prompt takes one user message.")),
        max_tokens=(int | None, tokens),
        max_completion_tokens=(int | None, tokens),
        logprobs=(bool | None, Field(None, description="Classification prompts only: the label probabilities.")),
        top_logprobs=(int | None, Field(None, ge=0, le=20, description="With logprobs: the top k labels.")),
        tools=(list[dict[str, Any]] | None, Field(None, description="Accepted only as [].")),
        tool_choice=(str | dict[str, Any] | None, Field(None, description="Accepted only as \"none\".")),
        functions=(list[dict[str, Any]] | None, Field(None, description="Accepted only as [].")),
        function_call=(str | dict[str, Any] | None, Field(None, description="Accepted only as \"none\".")),
        response_format=(dict[str, Any] | None, Field(None, description="Accepted only as {\"type\": \"text\"}.")),
        parallel_tool_calls=(bool | None, Field(None, description="Accepted and ignored (no tools).")),
    )


# ----------------------------------------------------------------------------- responses

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = Field(description="The base model's id for a prompt; null for the base model.")
    softprompt: dict[str, Any] | None = Field(None, description="A prompt's task, length (virtual tokens) and labels.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Real tokens of the rendered input (template, chat template); the "
                               "prompt's virtual tokens are softprompt.virtual_tokens.")
    completion_tokens: int = Field(description="Tokens generated; a classification: tokens of the predicted label.")
    total_tokens: int


class SoftpromptInfo(BaseModel):
    prompt: str | None = Field(description="The prompt that ran (null: the base model).")
    task: TaskKind
    virtual_tokens: int = Field(description="The prompt's length (not in usage).")
    probs: dict[str, float] | None = Field(None, description="A classification's label probabilities.")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage
    softprompt: SoftpromptInfo


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage
    softprompt: SoftpromptInfo


OPENAI_SSE = {
    "type": "object", "required": ["data"],
    "description": "Server-sent events: `data: {chunk}` (object text_completion or chat.completion.chunk), then "
                   "`data: [DONE]`; an error after the first event is `data: {\"error\": {...}}`.",
    "properties": {"data": {"type": "string"}},
}
