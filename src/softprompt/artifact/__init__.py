"""Prompt artifacts: the prompt file (safetensors + JSON metadata, versioned, atomic writes) and
conversion to and from Hugging Face PEFT adapters.

- ``prompt_file.py``  the prompt file: PromptMeta, save/load, checks against a base model
- ``peft_adapter.py`` reading a PEFT prompt-learning adapter directory
- ``peft.py``         prompt files <-> PEFT adapters (import, export)
- ``peft_prefix.py``  deep prompts <-> PEFT PREFIX_TUNING adapters: the tensor layout
"""

from .prompt_file import (  # noqa: F401
    FORMAT_VERSION,
    MAX_PROMPT_FILE_BYTES,
    STORAGE_DTYPES,
    TaskType,
    TASK_TYPES,
    PromptMeta,
    LoadedPrompt,
    atomic_write_bytes,
    safetensors_bytes,
    prompt_bytes,
    tensor_shape,
    shape_words,
    save_prompt,
    read_safetensors,
    prompt_from_bytes,
    check_compatible,
    load_prompt,
)
