"""Serving many soft prompts on one base model.

- ``config.py``   the typed, validated settings of ``softprompt serve``
- ``bank.py``     the loaded prompts, each with its key/value prefix computed once
- ``batching.py`` pure functions: choosing jobs, laying out cached prefixes, splitting outputs
- ``engine.py``   the in-process engine: queue, mixed-task dynamic batching, generation
- ``app.py``      the HTTP shell (FastAPI), ``start_server`` / ``run_server``
"""

from .config import EngineConfig, ServeConfig
from .engine import ClassifyRequest, ClassifyResult, Engine, GenerateRequest, GenerateResult, create_engine

__all__ = ["EngineConfig", "ServeConfig", "Engine", "create_engine", "ClassifyRequest", "ClassifyResult",
           "GenerateRequest", "GenerateResult"]
