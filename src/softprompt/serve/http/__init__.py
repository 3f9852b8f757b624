"""The HTTP shell around the engine (FastAPI): a thin layer, every batching decision is the engine's.

- ``routes.py``  the app and its routes (inference, prompts, ops); the endpoint list is there
- ``errors.py``  errors as JSON with their statuses; the exception handlers
- ``guard.py``   ASGI guard: API key, body size limit, HTTP metrics
- ``bridge.py``  engine jobs awaited from the event loop; streamed generation as server-sent events
- ``openai_api.py``      OpenAI's API on the same app: /v1/models, /v1/completions, /v1/chat/completions
- ``openai_schemas.py``  its request bodies, responses and error shape
- ``server.py``  uvicorn in a background thread (``start_server``) or in the foreground (``run_server``)
"""

from .routes import build_app
from .server import RunningServer, run_server, start_server

__all__ = ["build_app", "start_server", "run_server", "RunningServer"]
