"""Latency of requests on one kept-alive connection, the way every HTTP client library (the
``openai`` client included) talks to the server: the server's listening socket as shipped
(``socket(..., IPPROTO_TCP)``, so asyncio turns Nagle off on accepted connections) against the
socket it had before (``proto=0``: Nagle on, and each request after the first on a connection
waits for the client's delayed ACK). Both servers run side by side in one process, on a tiny
random model (the routes measured do no model work), requests alternating between them.

Run:
    .venv/bin/python bench/keepalive.py
Writes results/keepalive.json/.md.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import httpx

from common import set_threads, write_results

from softprompt.serve import Engine, ServeConfig
from softprompt.serve.http import server as http_server
from softprompt.testing import tiny_base


def nagle_bind(host: str, port: int) -> socket.socket:
    """The listening socket as it was before TCP_NODELAY: proto 0, which asyncio does not treat as TCP."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def timed(client: httpx.Client, method: str, path: str, **kw) -> float:
    t0 = time.perf_counter()
    r = client.request(method, path, **kw)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per connection and route")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    base = tiny_base(Path(tempfile.mkdtemp()) / "tiny")
    servers = {}
    for name, bind in (("shipped (TCP_NODELAY)", http_server._bind), ("before (Nagle on)", nagle_bind)):
        with mock.patch.object(http_server, "_bind", bind):
            servers[name] = http_server.start_server(ServeConfig(port=0), engine=Engine(base))
    routes = [("GET", "/healthz", {}), ("GET", "/v1/models", {})]
    times: dict[tuple[str, str], list[float]] = {(s, r[1]): [] for s in servers for r in routes}
    try:
        clients = {s: httpx.Client(base_url=srv.url, timeout=30) for s, srv in servers.items()}
        for _ in range(args.requests):  # alternate servers, so load changes hit both alike
            for s, c in clients.items():
                for method, path, kw in routes:
                    times[(s, path)].append(timed(c, method, path, **kw))
        for c in clients.values():
            c.close()
    finally:
        for srv in servers.values():
            srv.stop()
    rows = []
    for (s, path), t in times.items():
        later = t[1:]  # the first request opens the connection
        rows.append({"server": s, "route": path, "requests": len(later), "median_ms": round(statistics.median(later), 2),
                     "p90_ms": round(sorted(later)[int(0.9 * len(later))], 2)})
    ratio = {path: round(statistics.median(times[("before (Nagle on)", path)][1:])
                         / statistics.median(times[("shipped (TCP_NODELAY)", path)][1:]), 1) for _, path, _ in routes}
    write_results("keepalive", rows, summary={f"before/shipped median {p}": v for p, v in ratio.items()},
                  notes="One kept-alive httpx connection per server; the first request of each connection left out.")


if __name__ == "__main__":
    main()
