"""Running the HTTP server (uvicorn): in a background thread (:func:`start_server`, tests and
embedding) or in the calling thread until interrupted (:func:`run_server`, ``softprompt serve``)."""

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from ...errors import SoftpromptError
from ..config import ServeConfig
from ..engine import Engine, create_engine
from .routes import build_app


@dataclass
class RunningServer:
    """A server started by :func:`start_server`, serving in a background thread."""

    url: str
    engine: Engine
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.engine.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an
    # accepted socket inherits it. Without it Nagle meets delayed ACK and every request after the
    # first on a kept-alive connection waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise SoftpromptError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: FastAPI, config: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=config.log_level in ("info", "debug", "trace"),
                                         timeout_graceful_shutdown=5))


def start_server(config: ServeConfig, engine: Engine | None = None, ready_timeout: float = 30.0) -> RunningServer:
    """Start the server in a background thread and return once it accepts connections.

    Args:
        config: settings; ``port=0`` picks a free port (see ``RunningServer.url``).
        engine: an engine to serve (started here if it is not); default: built from ``config``
            (loads the model and every prompt of ``config.prompts_dir``).
    """
    engine = engine or create_engine(config)
    engine.start()
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    server = _uvicorn_server(build_app(engine, config), config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="softprompt-http", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > ready_timeout:
            engine.stop()
            raise SoftpromptError(f"the server did not start on {config.host}:{port}")
        time.sleep(0.01)
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    return RunningServer(f"http://{host}:{port}", engine, server, thread)


def run_server(config: ServeConfig, engine: Engine | None = None, on_ready=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), in the calling thread.

    Args:
        on_ready: called with the base URL once the socket is bound and the model loaded.
    """
    engine = engine or create_engine(config)
    engine.start()
    try:
        sock = _bind(config.host, config.port)
        port = sock.getsockname()[1]
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        app = build_app(engine, config)
        if app.state.keys is not None:
            app.state.keys.reload_on_sighup()  # kill -HUP re-reads --api-keys
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        _uvicorn_server(app, config).run(sockets=[sock])
    finally:
        engine.stop()
