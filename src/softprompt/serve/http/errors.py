"""Errors as HTTP: the status and type of each error class, the ``{"error": {"type", "message"}}``
body, the exception handlers, and the error responses each route documents in OpenAPI.

Not here: the error classes (serve/errors.py, softprompt/errors.py).
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import logging

from ...errors import PromptFileError, SoftpromptError
from ..config import EngineConfig
from ..errors import (
    BadPromptNameError, EngineStoppedError, ForbiddenError, InputTooLongError, InvalidRequestError, QueueFullError,
    RequestCancelledError, RequestError, RequestTimeoutError, RequestTooLargeError, UnknownPromptError,
    UploadTooLargeError, WrongTaskError,
)
from ..schemas import ErrorOut, validation_error

log = logging.getLogger("softprompt.serve.app")

STATUS: dict[type, tuple[int, str]] = {
    UnknownPromptError: (404, "unknown_prompt"),
    ForbiddenError: (403, "forbidden"),
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


def documented(*codes: int) -> dict:
    """OpenAPI responses: each status with the error schema and what it means here."""
    what = {
        400: "Malformed JSON, or a prompt name that is not a plain file stem.",
        401: "Missing or wrong API key (only when the server has one).",
        403: "The API key may not do this (write this namespace, read the metrics).",
        404: "Unknown prompt, or one the API key may not use.",
        413: "Request body over --max-upload-bytes, or a request over a limit (input, labels, scoring tokens, "
             "stop strings, requests per batch call); the message names the flag.",
        422: "An invalid field (type, range), a prompt of the wrong task, or an invalid prompt file.",
        429: "The queue is full (--max-queue); retry later (Retry-After).",
        503: "Not answered within --request-timeout, or the server is shutting down (Retry-After).",
    }
    return {c: {"model": ErrorOut, "description": what[c]} for c in codes}


BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's detail when the body is JSON it could not decode past the JSON syntax check: invalid
UTF-8, nesting past Python's recursion limit, an integer past Python's 4,300-digit limit."""


def http_exception_error(exc: StarletteHTTPException) -> tuple[int, str, str]:
    """(status, type, message) of an HTTP-level refusal (no route, wrong method, a body that does not parse)."""
    if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
        return 400, "malformed_json", "malformed JSON: the body is not valid UTF-8 JSON within the parser's limits"
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return exc.status_code, kind, str(exc.detail)


COMMON = (401, 413)
"""Statuses every route can answer (the guard in front of the app)."""


def install_handlers(app: FastAPI, limits: EngineConfig) -> None:
    """Every error the app raises answered as an error body with its status."""

    @app.exception_handler(SoftpromptError)
    async def on_user_error(request: Request, exc: SoftpromptError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        status, kind, message = validation_error(exc.errors(), limits)
        return JSONResponse(error_body(kind, message), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        status, kind, message = http_exception_error(exc)
        return JSONResponse(error_body(kind, message), status_code=status)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(exc)
