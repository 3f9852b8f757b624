"""Tiny random-weight models and a tiny tokenizer, built offline from a config.

For tests and benchmarks that must not download anything. ``tiny_model_dir`` writes a real HF
checkpoint directory (config, safetensors weights, tokenizer), so loading goes through the same
``from_pretrained`` path a user's local model takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import BaseModel, load_base_model

CORPUS = """
the quick brown fox jumps over the lazy dog . sports business politics technology entertainment
positive negative neutral great terrible okay the match was won by the home team in extra time
shares fell as the market reacted to the interest rate decision by the central bank
the minister said the election would be held next spring after parliament voted
a new phone with a faster chip and better camera was announced at the trade show
the film won three awards and the singer released a new album to strong reviews
text topic label input output headline summary answer question review sentiment
i loved this movie it was wonderful ! i hated the service , it was awful . it was fine .
""".strip()

FAMILIES = ("llama", "qwen2", "gpt2", "gemma")
SLIDING_FAMILIES = ("gemma2", "gemma3", "mistral")
"""Families with sliding-window layers; their tiny models' window is ``SLIDING_WINDOW`` tokens."""
SLIDING_WINDOW = 8


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in-process on a small corpus (multi-token words happen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
"""A ChatML-like chat template, so the tiny models run the chat baseline like an instruct model."""


def tiny_config(family: str = "llama", vocab_size: int = 400, hidden: int = 64, layers: int = 2):
    """A small config of the given family (random weights are drawn from it)."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    if family == "gemma":
        return GemmaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=512, **common)
    if family in ("gemma2", "gemma3"):  # a sliding layer with a tiny window, then a full layer
        from transformers import Gemma2Config, Gemma3TextConfig

        cls = Gemma2Config if family == "gemma2" else Gemma3TextConfig
        return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                   sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                   **common)
    if family == "mistral":  # one window for every layer, no layer_types
        from transformers import MistralConfig

        return MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             sliding_window=SLIDING_WINDOW, **common)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES + SLIDING_FAMILIES)}")


def tiny_model_dir(path: str | Path, family: str = "llama", seed: int = 0, **config_kw) -> Path:
    """Write a tiny random-weight checkpoint + tokenizer to ``path`` (skipped if already there)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = tiny_tokenizer()
    config = tiny_config(family, vocab_size=len(tok), **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; widen the embeddings so tests see non-trivial scores.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_base(path: str | Path, family: str = "llama", **kw) -> BaseModel:
    """Build (once) and load a tiny random-weight model of ``family`` as a frozen BaseModel."""
    return load_base_model(str(tiny_model_dir(path, family, **kw)))
