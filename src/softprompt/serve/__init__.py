"""Serving many soft prompts on one base model.

- ``config.py``   the typed, validated settings of ``softprompt serve``
- ``bank.py``     the loaded prompts, each with its key/value prefix computed once
- ``batching.py`` pure functions: choosing jobs, laying out cached prefixes, splitting outputs
- ``limits.py``   what one request may cost, checked before it is queued (pure)
- ``jobs.py``     requests, results, and the job that carries a request to exactly one outcome
- ``engine.py``   the in-process engine: queue, deadlines, mixed-task dynamic batching, generation
- ``schemas.py``  the HTTP request/response schemas, built from the limits (the OpenAPI contract)
- ``app.py``      the HTTP shell (FastAPI), ``start_server`` / ``run_server``
"""

from .config import EngineConfig, ServeConfig
from .engine import Engine, create_engine
from .jobs import ClassifyRequest, ClassifyResult, GenerateRequest, GenerateResult

__all__ = ["EngineConfig", "ServeConfig", "Engine", "create_engine", "ClassifyRequest", "ClassifyResult",
           "GenerateRequest", "GenerateResult"]
