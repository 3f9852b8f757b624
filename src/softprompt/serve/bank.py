"""The prompt bank: the prompts a server holds, each checked against the base model and with its
key/value prefix computed once, when it is loaded (an input prompt runs through the model once; a
deep prompt's stored tensor already is its prefix, so it loads without a model pass).

Not here: batching (batching.py, scheduler.py) or HTTP (http/). Thread-safe: loads and unloads may
come from any thread while the engine reads entries; an entry is immutable, so a request keeps the
prompt it was accepted with even if that prompt is unloaded or replaced meanwhile.
"""

from __future__ import annotations

import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..artifact import (
    MAX_PROMPT_FILE_BYTES, LoadedPrompt, PromptMeta, check_compatible, load_prompt, prompt_bytes, prompt_from_bytes,
)
from ..data import TaskSpec
from ..errors import DataError, PromptFileError
from ..model import PromptedModel
from ..prefix import PrefixKV
from .config import EngineConfig
from .errors import BadPromptNameError, InvalidRequestError, UnknownPromptError, UploadTooLargeError
from .limits import check_label_ids, check_label_names, check_unicode

NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
"""Prompt names: 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, never two
dots in a row (file stems of ``<name>.safetensors`` in the prompts folder: no path separators, no
``..``). Written without look-arounds so that it is a portable JSON-schema ``pattern`` too."""
NAME_MAX = 128
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))

SUFFIX = ".safetensors"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid prompt name, else raise :class:`BadPromptNameError`."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME_RE.fullmatch(name) or ".." in name:
        raise BadPromptNameError(
            f"invalid prompt name {name!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class PromptEntry:
    """A loaded prompt: tensor, metadata, task spec, cached prefix and (classify) label tokens."""

    name: str
    tensor: torch.Tensor  # as stored, on the model's device: (P, d) float32, or a deep prompt's
    # (layers, 2, kv_heads, P, head_dim) in the model's dtype (its prefix's layers are views of it)
    meta: PromptMeta
    spec: TaskSpec
    prefix: PrefixKV  # per layer (H, P, hd)
    label_ids: tuple[tuple[int, ...], ...] | None
    source: str  # "file" or "upload"

    @property
    def length(self) -> int:
        return self.prefix.length

    def describe(self) -> dict:
        """Public facts about the prompt (for listings)."""
        return {
            "name": self.name, "task": self.spec.kind, "length": self.length, "labels": self.spec.labels,
            "template": self.spec.template, "base_model": self.meta.base_model, "source": self.source,
            "training": self.meta.training, "method": self.meta.method, "shape": list(self.tensor.shape),
        }


class PromptBank:
    """Named prompts on one frozen base model.

    Args:
        pm: the prompted base model.
        directory: folder of ``<name>.safetensors`` files (None: uploads only).
        strict: refuse prompts whose base-model fingerprint differs (see ``check_compatible``).
        max_spec_length: ``TaskSpec.max_length`` used to render sources (inputs longer than the
            server's limit are refused before they could be cut).
        model_lock: held while a prefix is computed (the engine holds it while running batches).
        limits: the server's limits a prompt's own labels must keep (``--max-labels``,
            ``--max-label-tokens``); None: no limits.
        prefixer: ``(name, tensor, meta) -> PrefixKV`` when another process runs the model
            (``--backend vllm``): the bank then never runs the model; None: compute the prefix here.
    """

    def __init__(self, pm: PromptedModel, directory: str | Path | None = None, *, strict: bool = True,
                 max_spec_length: int = 4096, model_lock: threading.Lock | None = None,
                 limits: EngineConfig | None = None, prefixer=None):
        self.pm = pm
        self.directory = Path(directory) if directory is not None else None
        self.strict = strict
        self.max_spec_length = max_spec_length
        self._lock = threading.Lock()
        self._model_lock = model_lock or nullcontext()
        self.limits = limits
        self.prefixer = prefixer
        self._entries: dict[str, PromptEntry] = {}

    # -- reading

    def get(self, name: str) -> PromptEntry:
        """The entry called ``name``; raises :class:`UnknownPromptError`."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownPromptError(f"unknown prompt {name!r}; loaded: {', '.join(self.names()) or 'none'}")
        return entry

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[PromptEntry]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    # -- loading

    def path_of(self, name: str) -> Path:
        """``<directory>/<name>.safetensors``; the name cannot leave the directory."""
        check_name(name)
        if self.directory is None:
            raise UnknownPromptError(f"no prompts folder to load {name!r} from (start the server with --prompts)")
        path = self.directory / f"{name}{SUFFIX}"
        assert path.parent == self.directory  # the name holds no separator or ".."
        return path

    def load_all(self) -> list[str]:
        """Load every ``*.safetensors`` file of the directory; returns the names loaded."""
        if self.directory is None:
            return []
        names = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if len(name) > NAME_MAX or not NAME_RE.fullmatch(name) or ".." in name:
                raise BadPromptNameError(f"{path}: file name is not a valid prompt name")
            self.load_file(name)
            names.append(name)
        return names

    def load_file(self, name: str) -> PromptEntry:
        """(Re)load ``<directory>/<name>.safetensors``."""
        path = self.path_of(name)
        if not path.is_file():
            raise UnknownPromptError(f"no prompt file {path.name} in the prompts folder")
        loaded = load_prompt(path, self.pm.base, strict=self.strict)
        return self._add(name, loaded, "file")

    def load_bytes(self, name: str, data: bytes, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> PromptEntry:
        """(Re)load a prompt from uploaded prompt-file bytes (kept in memory only)."""
        check_name(name)
        if len(data) > max_bytes:
            raise UploadTooLargeError(f"upload of {len(data)} bytes is larger than --max-upload-bytes {max_bytes}")
        loaded = prompt_from_bytes(data, f"upload {name!r}")
        check_compatible(loaded.meta, self.pm.base, f"upload {name!r}", strict=self.strict)
        return self._add(name, loaded, "upload")

    def add_tensor(self, name: str, tensor: torch.Tensor, meta: PromptMeta) -> PromptEntry:
        """Add an in-memory prompt with its metadata (checked like a file): (P, d), or a deep
        prompt (layers, 2, kv_heads, P, head_dim) when ``meta.method == "prefix"``."""
        check_name(name)
        loaded = prompt_from_bytes(prompt_bytes(tensor, replace(meta), "float32"), f"prompt {name!r}")  # as a file would be
        check_compatible(loaded.meta, self.pm.base, f"prompt {name!r}", strict=self.strict)
        return self._add(name, loaded, "memory")

    def unload(self, name: str) -> None:
        """Forget a prompt; requests already accepted for it still complete."""
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise UnknownPromptError(f"unknown prompt {name!r}; loaded: {', '.join(sorted(self._entries)) or 'none'}")

    def _add(self, name: str, loaded: LoadedPrompt, source: str) -> PromptEntry:
        meta = loaded.meta
        tok = self.pm.base.tokenizer
        if self.limits is not None and meta.length > self.limits.max_prompt_tokens:
            raise UploadTooLargeError(f"prompt {name!r} has {meta.length} virtual tokens, more than --max-prompt-tokens "
                                      f"{self.limits.max_prompt_tokens}")
        try:
            spec = TaskSpec.from_meta(meta, max_length=self.max_spec_length)
            # the file's own strings go to the tokenizer: refuse what it cannot take, and labels
            # beyond the server's limits, now rather than on every request
            check_unicode(spec.template, "its template")
            for what, words in (("its labels", spec.labels or []), ("its verbalized labels", spec.words)):
                if self.limits is not None:
                    check_label_names(words, self.limits, what)
                for i, w in enumerate(words):
                    check_unicode(w, f"{what}[{i}]")
            label_ids = tuple(tuple(ids) for ids in spec.label_ids(tok)) if spec.kind == "classify" else None
            if label_ids is not None and self.limits is not None:
                check_label_ids(label_ids, self.limits, "its labels")
        except (DataError, InvalidRequestError) as e:
            raise PromptFileError(f"prompt {name!r}: {e}") from None
        if self.prefixer is not None:  # the model runs elsewhere (vLLM): it checks (deep prompts: refused) and wraps the rows
            tensor = loaded.tensor.to(self.pm.base.device)
            prefix = self.prefixer(name, tensor, meta)
        elif meta.method == "prefix":  # the stored keys/values are the prefix: no model pass
            tensor = loaded.tensor.to(self.pm.base.device, self.pm.lm.dtype)  # (layers, 2, H, P, hd)
            prefix = PrefixKV.from_deep(tensor)
        else:
            tensor = loaded.tensor.to(self.pm.base.device)  # (P, d)
            with self._model_lock:
                prefix = PrefixKV.compute(self.pm, tensor)
        entry = PromptEntry(name, tensor, meta, spec, prefix, label_ids, source)
        with self._lock:
            self._entries[name] = entry
        return entry
