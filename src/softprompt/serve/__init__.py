"""Serving many soft prompts on one base model.

- ``config.py``   the typed, validated settings of ``softprompt serve``
- ``bank.py``     the loaded prompts, each with its key/value prefix computed once
- ``batching.py`` pure functions: choosing jobs, laying out cached prefixes, splitting outputs
- ``limits.py``   what one request may cost, checked before it is queued (pure)
- ``jobs.py``     requests, results, and the job that carries a request to exactly one outcome
- ``admission.py`` a request validated, bounded and tokenized into a job (caller's thread)
- ``scheduler.py`` the queue, deadlines and the worker loop that batches jobs
- ``steps.py``    the model steps behind a ``ModelSteps`` interface (in-process transformers)
- ``engine.py``   the engine: composes admission, scheduler and steps
- ``schemas.py``  the HTTP request/response schemas, built from the limits (the OpenAPI contract)
- ``http/``       the HTTP shell (FastAPI): routes, errors, guard, SSE, ``start_server`` / ``run_server``
"""

from .config import EngineConfig, ServeConfig
from .engine import Engine, create_engine
from .jobs import ClassifyRequest, ClassifyResult, GenerateRequest, GenerateResult

__all__ = ["EngineConfig", "ServeConfig", "Engine", "create_engine", "ClassifyRequest", "ClassifyResult",
           "GenerateRequest", "GenerateResult"]
