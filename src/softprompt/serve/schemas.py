"""The HTTP API's request and response schemas, built from the server's limits so that the OpenAPI
document states them (ranges, lengths, the prompt-name pattern) and FastAPI enforces them.

The engine checks the same limits again (in-process callers, and what a schema cannot say: tokens).
``validation_error`` turns a schema violation into the server's one-line error, naming the flag.
Not here: routes (http/routes.py), the limits themselves (config.py, limits.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from .store import MAX_SEGMENTS, NAME_MAX, PROMPT_MAX, PROMPT_PATTERN
from .config import EngineConfig
from .jobs import ClassifyRequest, GenerateRequest
from .limits import CHARS_PER_TOKEN_LIMIT, SEED_MAX, SEED_MIN


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_request, input_too_long, queue_full.")
    message: str = Field(description="One line naming the problem (and the flag of a limit).")


class ErrorOut(BaseModel):
    """Every error: ``{"error": {"type", "message"}}``."""

    error: ErrorDetail


class ClassifyOut(BaseModel):
    label: str
    probs: dict[str, float]
    scores: list[list[float]] = Field(description="Summed log-probability of each label, per prompt.")
    prompts: list[str]


class GenerateOut(BaseModel):
    text: str
    finish_reason: Literal["eos", "stop", "length"]
    tokens: int
    prompt: str | None


class ClassifyBatchOut(BaseModel):
    results: list[ClassifyOut]


class GenerateBatchOut(BaseModel):
    results: list[GenerateOut]


class PromptOut(BaseModel):
    name: str
    task: str
    length: int
    labels: list[str] | None
    template: str
    base_model: str | None
    source: Literal["file", "upload", "memory"]
    training: dict[str, Any] | None
    method: Literal["prompt", "prefix"] = Field("prompt", description="prompt: an input prompt (P, d); prefix: a deep "
                                               "prompt, keys/values at every layer (layers, 2, kv_heads, P, head_dim)")
    shape: list[int] = Field(default_factory=list, description="Shape of the stored prompt tensor.")


class PromptListOut(BaseModel):
    prompts: list[PromptOut]
    available: list[str] = Field(description="Prompt files in --prompts that are not loaded.")
    next: str | None = Field(None, description="With `limit`: the `after` of the next page; null on the last page.")


class UnloadedOut(BaseModel):
    unloaded: str


class HealthOut(BaseModel):
    status: Literal["ok", "stopped"]
    model: str
    prompts: int
    queue_depth: int


@dataclass(frozen=True)
class Bodies:
    """The request body models of one server (their constraints come from its limits)."""

    classify: type[BaseModel]
    generate: type[BaseModel]
    classify_batch: type[BaseModel]
    generate_batch: type[BaseModel]


def prompt_name(**kw) -> Any:
    """A prompt name, optionally in a namespace (``acme/ticket-routing``)."""
    return Field(pattern=PROMPT_PATTERN, min_length=1, max_length=PROMPT_MAX, **kw)


def request_bodies(limits: EngineConfig) -> Bodies:
    """Request bodies whose JSON schema carries ``limits``."""
    text_chars = CHARS_PER_TOKEN_LIMIT * limits.max_input_tokens
    label_chars = CHARS_PER_TOKEN_LIMIT * limits.max_label_tokens
    strict = ConfigDict(extra="forbid", strict=True)
    Stop = Annotated[str, Field(min_length=1, max_length=limits.max_stop_chars)]  # noqa: N806
    NameT = Annotated[str, prompt_name()]  # noqa: N806
    Label = Annotated[str, Field(min_length=1, max_length=label_chars)]  # noqa: N806

    def to_classify(self) -> ClassifyRequest:
        names = [] if self.prompt is None else [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return ClassifyRequest(self.text, names, self.labels, self.template)

    def to_generate(self) -> GenerateRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return GenerateRequest(self.text, self.prompt, self.max_new_tokens, self.temperature, self.top_p, self.seed, stop)

    classify = create_model(
        "ClassifyBody", __config__=strict, __doc__="Classify ``text``: with a prompt, an ensemble of prompts, or the "
        "bare model (no prompt + ``labels``).",
        text=(str, Field(max_length=text_chars, description="The input text (put into each prompt's "
                         f"template); at most --max-input-tokens ({limits.max_input_tokens}) tokens with the template.")),
        prompt=(NameT | Annotated[list[NameT], Field(max_length=limits.max_ensemble)] | None, Field(
            None, description="A prompt name, or several (an ensemble: same labels, probabilities averaged; at most "
            "--max-ensemble); omit for the bare model.")),
        labels=(Annotated[list[Label], Field(min_length=2, max_length=limits.max_labels)] | None, Field(
            None, description=f"Bare model only: the class labels (at most --max-labels, each at most "
            f"--max-label-tokens {limits.max_label_tokens} tokens).")),
        template=(str | None, Field(None, min_length=1, max_length=text_chars,
                                    description="Bare model only: template with {text}.")),
    )
    classify.to_request = to_classify
    generate = create_model(
        "GenerateBody", __config__=strict,
        __doc__="Continue ``text`` with a generation prompt (its template applied) or the bare model.",
        text=(str, Field(max_length=text_chars, description="The input text.")),
        prompt=(NameT | None, Field(None, description="A generation prompt's name; omit for the bare model.")),
        max_new_tokens=(int, Field(limits.default_new_tokens, ge=1, le=limits.max_new_tokens,
                                   description="Most tokens to generate (at most --max-new-tokens).")),
        temperature=(float, Field(0.0, ge=0, le=100, description="0 = greedy; more = sampling.")),
        top_p=(float, Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")),
        seed=(int | None, Field(None, ge=SEED_MIN, le=SEED_MAX, description="Sampling seed (same seed, same tokens).")),
        stop=(Annotated[list[Stop], Field(max_length=limits.max_stop)] | Stop, Field(default_factory=list, description="Strings that end the generation (at most "
                                 "--max-stop, each at most --max-stop-chars characters).")),
        stream=(bool, Field(False, description="Stream tokens as server-sent events.")),
    )
    generate.to_request = to_generate
    n = limits.batch_requests
    classify_batch = create_model(
        "ClassifyBatchBody", __config__=strict,
        requests=(list[classify], Field(max_length=n, description=f"Classify requests, answered in order (at most {n}).")),
    )
    generate_batch = create_model(
        "GenerateBatchBody", __config__=strict,
        requests=(list[generate], Field(max_length=n, description=f"Generate requests (no streaming), answered in "
                                        f"order (at most {n}).")),
    )
    return Bodies(classify, generate, classify_batch, generate_batch)


# ----------------------------------------------------------------------------- validation errors

_LIMIT_KINDS = {"too_long", "string_too_long", "less_than_equal", "less_than", "greater_than_equal", "greater_than"}
"""Pydantic error types of a broken range or length (the message then names the flag)."""

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "function-after", "function-plain", "constrained-str"}


def _flag(loc: list, kind: str, limits: EngineConfig) -> str | None:
    """The flag behind a failed constraint at ``loc`` (field names and list indices)."""
    names = [x for x in loc if isinstance(x, str)]
    field = names[-1] if names else ""
    item = bool(loc) and isinstance(loc[-1], int)
    if field == "requests" and not item:
        return f"--max-batch-requests {limits.batch_requests}"
    table = {
        "text": f"--max-input-tokens {limits.max_input_tokens}",
        "template": f"--max-input-tokens {limits.max_input_tokens}",
        "labels": f"--max-label-tokens {limits.max_label_tokens}" if item else f"--max-labels {limits.max_labels}",
        "stop": f"--max-stop-chars {limits.max_stop_chars}" if item or kind == "string_too_long" else f"--max-stop {limits.max_stop}",
        "max_new_tokens": f"--max-new-tokens {limits.max_new_tokens}",
        "prompt": None if item or kind.startswith("string") else f"--max-ensemble {limits.max_ensemble}",
    }
    return table.get(field)


def validation_error(errors: list[dict], limits: EngineConfig) -> tuple[int, str, str]:
    """(status, type, message) of the first relevant schema violation.

    Malformed JSON is 400; a list or string longer than a limit is 413 (like an input over
    --max-input-tokens), any other invalid field 422; a bad prompt name in the path is 400.
    """
    if not errors:
        return 422, "invalid_request", "invalid request"
    if errors[0].get("type") == "json_invalid":
        first = errors[0]
        return 400, "malformed_json", f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}"
    # a union reports one error per member; the wrong-type ones say least
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    loc = [x for x in first.get("loc", ()) if x not in ("body", "path", "query")
           and not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
    where = ".".join(str(x) for x in loc) or "body"
    kind = str(first.get("type", ""))
    if first.get("loc", ())[:1] == ("path",):
        return 400, "bad_prompt_name", (f"invalid prompt name: use 1-{NAME_MAX} letters, digits, '_', '-' or '.', "
                                         "starting with a letter or digit, no '..'")
    if kind == "string_unicode":  # a lone surrogate escape such as "\ud800"
        return 422, "invalid_request", f"{where}: invalid Unicode (a lone surrogate: \\ud800-\\udfff escapes come in pairs)"
    if kind == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == PROMPT_PATTERN:
        return 422, "invalid_request", (f"{where}: not a prompt name or namespace: 1-{MAX_SEGMENTS} segments joined "
                                        f"by '/', each of 1-{NAME_MAX} letters, digits, '_', '-' or '.' starting with "
                                        "a letter or digit")
    message = f"{where}: {first.get('msg', 'invalid')}"
    flag = _flag(loc, kind, limits) if kind in _LIMIT_KINDS else None
    if flag:
        message += f" ({flag})"
    if kind in ("string_too_long", "too_long") and flag:
        return 413, "limit_exceeded", message
    return 422, "invalid_request", message
