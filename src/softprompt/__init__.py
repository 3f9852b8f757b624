"""softprompt: prompt tuning for frozen open language models.

Train a few virtual tokens per task, save each as a small file, serve many on one base model.
"""

from .version import __version__  # noqa: E402,F401

from .errors import SoftpromptError, ConfigError, DataError, ModelLoadError, PromptFileError  # noqa: E402
from .base import BaseModel, load_base_model, wrap_base_model, DEFAULT_MODEL  # noqa: E402
from .prompt import SoftPrompt, INIT_STRATEGIES  # noqa: E402
from .model import PromptedModel, pack, IGNORE_INDEX  # noqa: E402
from .artifact import PromptMeta, LoadedPrompt, save_prompt, load_prompt, check_compatible  # noqa: E402

__all__ = [
    "SoftpromptError", "ConfigError", "DataError", "ModelLoadError", "PromptFileError",
    "BaseModel", "load_base_model", "wrap_base_model", "DEFAULT_MODEL",
    "SoftPrompt", "INIT_STRATEGIES",
    "PromptedModel", "pack", "IGNORE_INDEX",
    "PromptMeta", "LoadedPrompt", "save_prompt", "load_prompt", "check_compatible",
]
