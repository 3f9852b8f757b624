"""Serving soft prompts on a vLLM server through its ``prompt_embeds`` input.

A soft prompt cannot be sent to vLLM as tokens, but ``vllm serve --enable-prompt-embeds`` takes a
request's input as a (L, d) embedding matrix. This package builds ``[prompt (P, d) ; embeddings of
the request's tokens (T, d)]`` on the client side from the base model's embedding matrix alone, and
talks to the server over HTTP. Nothing here imports vllm: the server runs in its own venv.

- ``embeds.py``: the embedding table (only the embedding weights are read) and the wire encoding.
- ``labels.py``: how rank classification is split into first-token and continuation requests (pure).
- ``client.py``: the HTTP client; ``server_check.py``: its start-up checks.
- ``export.py``: ``softprompt export --format vllm``.
- ``steps.py``: the serving engine's model steps on the client (``softprompt serve --backend vllm``);
  ``backend.py``: connecting to (or launching, ``launch.py``) and checking the server for it.

Not here: the HTTP server of softprompt (serve/), which runs on either backend.
"""

from .client import Classification, VLLMClient, VLLMError
from .embeds import EmbeddingTable, decode_embeds, encode_embeds, request_embeds

__all__ = ["Classification", "EmbeddingTable", "VLLMClient", "VLLMError", "decode_embeds", "encode_embeds",
           "request_embeds"]
