"""Settings every command that runs a trained prompt file on its base model shares (``softprompt
eval`` and ``softprompt predict``): stated once here, each field also its flag (config_flags.py).

Not here: what each command adds (``EvalConfig`` in evaluate/compare.py, ``PredictConfig`` in predict.py).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from .config_flags import flag
from .errors import check_at_least, check_choice
from .precision import PRECISIONS


@dataclass
class ScoringConfig:
    """A prompt file, its base model, and how inputs are batched, cut and generated."""

    prompt: str = field(metadata=flag(positional=True))
    """The .safetensors prompt file."""
    _: KW_ONLY
    model: str | None = None
    """Base model (hub id or folder); default: the default model."""
    batch_size: int = 16
    """Examples per forward pass."""
    max_length: int | None = None
    """Most tokens of template + text (default: the prompt's training value, else 256)."""
    source_field: str | None = None
    """Field of the input text in the data (default: the task's, text / input)."""
    max_new_tokens: int | None = None
    """Generation length limit (generate; default: the task's target length)."""
    stop: list[str] = field(default_factory=list)
    """Stop string for generation (repeatable)."""
    allow_other_base: bool = False
    """Accept a prompt trained on a differently quantized copy of the base model."""
    precision: str = field(default="auto", metadata=flag(choices=PRECISIONS))
    """Compute precision, as training's: auto (bf16 autocast where the CPU/GPU runs bf16 natively, else fp32),
    fp32, bf16, fp16 (CUDA)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        check_choice("--precision", self.precision, PRECISIONS)
        check_at_least("--batch-size", self.batch_size, 1)
        check_at_least("--max-length", self.max_length, 8)
        check_at_least("--max-new-tokens", self.max_new_tokens, 1)
