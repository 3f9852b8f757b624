"""Errors a serving request can end with. The HTTP layer maps each class to a status code
(``app.STATUS``); in-process callers catch them like any :class:`SoftpromptError`."""

from __future__ import annotations

from ..errors import PromptFileError, SoftpromptError


class RequestError(SoftpromptError):
    """A request was refused or failed (base class)."""


class InvalidRequestError(RequestError):
    """Malformed or inconsistent request fields (e.g. empty input, an ensemble of generators)."""


class RequestTooLargeError(InvalidRequestError):
    """The request would cost more than a limit allows (labels, label tokens, scoring tokens, stop
    strings, requests in a batch call); the message names the flag."""


class InputTooLongError(RequestTooLargeError):
    """The input has more tokens than ``--max-input-tokens``."""


class UnknownPromptError(RequestError):
    """No prompt of that name is loaded (or in the prompts folder)."""


class BadPromptNameError(InvalidRequestError):
    """A prompt name that is not a plain file stem (it could escape the prompts folder)."""


class WrongTaskError(InvalidRequestError):
    """The prompt's task type does not match the endpoint (a generation prompt sent to classify)."""


class ForbiddenError(RequestError):
    """The request's API key may not do this (write that namespace, read the metrics)."""


class QueueFullError(RequestError):
    """The queue holds ``--max-queue`` requests already; retry later."""


class RequestTimeoutError(RequestError):
    """The request took longer than ``--request-timeout``."""


class RequestCancelledError(RequestError):
    """The caller gave up on the request (its HTTP client disconnected, a stream was closed)."""


class EngineStoppedError(RequestError):
    """The engine is not running (shutting down)."""


class UploadTooLargeError(PromptFileError):
    """An uploaded prompt file is larger than ``--max-upload-bytes``."""


class CacheTooSmallError(PromptFileError):
    """A prompt's entry (its key/value prefix) is larger than the whole ``--prefix-cache-mb``."""
