"""Who may do what, route by route: the guard puts each request's :class:`~..keys.Grant` into the
ASGI scope; the routes ask this module before they touch a prompt.

The rules (docs/guides/multi-tenant.md):

- a prompt the key may not use is answered exactly as a prompt that does not exist: 404
  ``unknown_prompt`` (OpenAI: ``model_not_found``), and the message lists only prompts the key may
  use, so the answer never tells whether another namespace holds that name;
- a write (``PUT``, ``POST .../load``, ``DELETE``) to a namespace the key may not write is 403
  ``forbidden``, decided from the name alone, before the prompt is looked at;
- listings (``/v1/prompts``, ``/v1/models``) and the count in ``/healthz`` hold only what the key
  may use; ``/metrics`` is for admin keys; ``/healthz``, ``/docs`` and ``/openapi.json`` for any key;
- the base model (no prompt) is every key's.

A prompt in the path (``{name}``, ``{model}``) is checked by :func:`path_access`, one dependency of
the whole app, so a new route with a prompt in its path is covered without a line of its own.

Not here: the key file and the grants (serve/keys.py); authentication (guard.py).
"""

import re
from typing import Awaitable, Callable, Iterable

from fastapi import FastAPI, Request

from ..bank import PromptBank
from ..errors import ForbiddenError, UnknownPromptError
from ..jobs import ClassifyRequest, GenerateRequest
from ..keys import ADMIN, Grant
from ..store import PROMPT_MAX, PROMPT_PATTERN, namespace_of

GRANT = "softprompt.grant"
"""Where the guard keeps a request's grant in the ASGI scope."""
PROMPT_PARAMS = ("name", "model")
"""Path parameters that name a prompt: ``{name}`` on the native routes, ``{model}`` on OpenAI's."""
SAFE_METHODS = ("GET", "HEAD")
"""Methods that read a prompt named in the path (``use``); any other writes it (``write``)."""
_PROMPT_RE = re.compile(PROMPT_PATTERN)


class HiddenPromptError(UnknownPromptError):
    """An unknown prompt answered to a scoped key: the message names only prompts it may use."""


def grant_of(request: Request) -> Grant:
    """The grant of the request's API key (the guard stores it in every request's scope)."""
    return request.scope[GRANT]


def usable(grant: Grant, names: Iterable[str]) -> list[str]:
    """Those of ``names`` the key may use, in their order."""
    return [n for n in names if grant.may_use(n)]


def prompts_of(request: ClassifyRequest | GenerateRequest) -> list[str]:
    """The prompts an engine request names (none: the base model)."""
    if isinstance(request, ClassifyRequest):
        return list(request.prompts)
    return [request.prompt] if request.prompt is not None else []


def unknown_prompt(grant: Grant, bank: PromptBank, name: str) -> HiddenPromptError:
    """The 404 for ``name``: the same whether it is another namespace's or nobody's."""
    return HiddenPromptError(f"unknown prompt {name!r}; loaded: {', '.join(usable(grant, bank.names())) or 'none'}")


def unknown_model(model: str) -> HiddenPromptError:
    """The OpenAI routes' 404 for ``model`` (their message lists no models)."""
    return HiddenPromptError(f"the model {model!r} does not exist; see GET /v1/models")


def check_use(request: Request, bank: PromptBank, names: Iterable[str]) -> None:
    """Each of ``names`` must be a loaded prompt the request's key may use; else a 404 naming only
    prompts it may use (an admin gets the bank's own error, later, as before)."""
    grant = grant_of(request)
    if grant.admin:
        return
    for name in names:
        if not grant.may_use(name) or name not in bank:
            raise unknown_prompt(grant, bank, name)


def check_write(request: Request, name: str) -> None:
    """403 unless the request's key may write ``name``'s namespace (whether or not it exists)."""
    if not grant_of(request).may_write(name):
        raise ForbiddenError(f"this API key may not write the namespace {namespace_of(name)!r} (prompt {name!r})")


def path_access(bank: PromptBank, base_model: str) -> Callable[[Request], Awaitable[None]]:
    """The app-wide dependency that checks a prompt named in the path: ``{model}`` (OpenAI) must be
    the base model or a prompt the key may use; ``{name}`` one it may use (GET) or write (any
    other method). A name that is no prompt name is left to the route (400)."""

    async def check_path(request: Request) -> None:
        grant = grant_of(request)
        if grant.admin:
            return
        params = request.path_params
        model = params.get("model")
        if model is not None and model != base_model and not grant.may_use(model):
            raise unknown_model(model)
        name = params.get("name")
        if name is None or len(name) > PROMPT_MAX or not _PROMPT_RE.fullmatch(name):
            return
        if request.method not in SAFE_METHODS:
            check_write(request, name)
        elif not grant.may_use(name):
            raise unknown_prompt(grant, bank, name)

    return check_path


async def admin_only(request: Request) -> None:
    """A dependency: 403 unless the request's key is an admin's."""
    if not grant_of(request).admin:
        raise ForbiddenError("this API key may not read the server's metrics (admin keys only)")


def hide_unknown_prompts(app: FastAPI) -> None:
    """Wrap the app's exception handlers (after all are installed): an unknown-prompt error raised
    elsewhere (the bank's message lists every loaded prompt) reaches a scoped key without names."""
    for cls, handler in list(app.exception_handlers.items()):
        app.exception_handlers[cls] = _hiding(handler)


def _hiding(handler: Callable) -> Callable:
    async def hide(request: Request, exc: Exception):
        if (isinstance(exc, UnknownPromptError) and not isinstance(exc, HiddenPromptError)
                and not request.scope.get(GRANT, ADMIN).admin):
            exc = HiddenPromptError("unknown prompt; see GET /v1/prompts (or GET /v1/models) for those this API key "
                                    "may use")
        return await handler(request, exc)

    return hide
