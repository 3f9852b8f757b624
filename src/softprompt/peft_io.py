"""Hugging Face PEFT interoperability, at its public import path (``softprompt.peft_io``); the code
lives in ``artifact/peft.py`` (conversion), ``artifact/peft_adapter.py`` (the PEFT files) and
``artifact/peft_prefix.py`` (deep prompts as PREFIX_TUNING adapters)."""

from .artifact.peft import (  # noqa: F401
    CONFIG_NAME, WEIGHTS_NAME, PROMPT_KEY, META_KEY, CAUSAL_LM, ENCODER_PARTS, UNSUPPORTED_REASONS,
    PEFT_INIT_NAMES, PeftAdapter, read_adapter_config, read_adapter, prompt_tuning_embeddings,
    p_tuning_embeddings, IMPORTERS, import_peft, save_imported, peft_base_name, peft_config_dict, export_peft,
    PEFT_TYPES,
)
from .artifact.peft_prefix import (  # noqa: F401
    PREFIX_TUNING, DEEP_IMPORTERS, to_peft, from_peft, prefix_config_dict, prefix_tuning_kv,
)
