"""The ASGI guard in front of every route: API key, body size limit, HTTP metrics."""

import time

from fastapi.responses import JSONResponse

from ..keys import ADMIN, KeyRing
from .access import GRANT
from .errors import error_body
from .openai_schemas import is_openai_path, openai_error_body


class Guard:
    """ASGI middleware in front of every route: API key, body size limit, HTTP metrics.

    The body is read (up to ``max_body`` bytes) before the app sees it, so an oversized request
    is answered 413 whether or not it declares its length; a request without a known key is
    refused before its body is read. The key's grant goes into the scope (``access.GRANT``) for
    the routes; without ``keys`` every request is an admin's.
    """

    def __init__(self, app, keys: KeyRing | None, max_body: int, metrics):
        self.app = app
        self.keys = keys
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
                body, refusal = await self._read_body(receive, scope)
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
        grant = ADMIN
        if self.keys is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            grant = self.keys.grant(given)
            if grant is None:
                return _refuse(scope, 401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)",
                               {"WWW-Authenticate": "Bearer"})
        scope[GRANT] = grant
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large(scope)
        return None

    async def _read_body(self, receive, scope) -> tuple[bytes, JSONResponse | None]:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return b"", _refuse(scope, 400, "disconnected", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", self._too_large(scope)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None

    def _too_large(self, scope) -> JSONResponse:
        return _refuse(scope, 413, "too_large", f"request body larger than --max-upload-bytes {self.max_body}")


def _refuse(scope, status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An error answered by the guard, in the error shape of the route asked for (OpenAI's on the
    OpenAI-compatible routes)."""
    if is_openai_path(scope.get("path", "")):
        return JSONResponse(openai_error_body(status, kind, message), status_code=status, headers=headers)
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)
