"""From the event loop to the engine and back: queued jobs awaited as futures, a disconnected
client cancelling its jobs, and a streamed generation as server-sent events.

Not here: the routes (routes.py), the engine (serve/engine.py).
"""

import asyncio
import json
from dataclasses import asdict
from typing import Any, AsyncIterator

from fastapi import Request

from ..engine import Engine
from ..errors import RequestCancelledError, RequestTimeoutError
from ..jobs import ClassifyResult, GenerateResult, Job
from .errors import error_body, status_of


def classify_out(r: ClassifyResult) -> dict:
    return asdict(r)


def generate_out(r: GenerateResult) -> dict:
    return {"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.token_ids), "prompt": r.prompt}


async def run_jobs(engine: Engine, request: Request, jobs: list[Job], timeout: float) -> list[Any]:
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
    # a call that ends early (disconnect, timeout) leaves the gather to fail later with the jobs'
    # cancellation: retrieve that, or asyncio logs "exception was never retrieved"
    results.add_done_callback(_retrieve)
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


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read already, so the next message is
    ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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


SSE_EVENT = {
    "type": "object", "required": ["event", "data"],
    "description": "One server-sent event: `token` ({\"text\"}), then `done` (a GenerateOut) or `error` (an ErrorOut); "
                   "data is JSON.",
    "properties": {"event": {"type": "string", "enum": ["token", "done", "error"]},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
}
"""The schema of each event of a streamed generation."""

def _sse_event(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def sse(job: Job, events: asyncio.Queue, timeout: float) -> AsyncIterator[str]:
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
