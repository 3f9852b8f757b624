"""The prompt bank: the prompts a server serves, each checked against the base model once, its
entry (tensor, task, key/value prefix) kept in a least-recently-used cache bounded in bytes.

The ``--prompts`` folder (store.py) is indexed at start-up from directory listings; a prompt is
read on first use (its bytes read once, then parsed and checked) and an input prompt's prefix is
computed by the worker thread before the step that needs it, with the other missing prefixes of
that step in one batched pass (prefill.py), and kept on disk too with ``--prefix-spill-mb``
(prefix_spill.py). An evicted prompt is read again on its next use.
Uploads are written to the folder (``durable``) or kept pinned in memory (they exist nowhere else).

Not here: batching (batching.py, scheduler.py) or HTTP (http/). Thread-safe: loads and unloads may
come from any thread while the engine reads entries; an entry is immutable and a request holds
its own reference, so a request keeps the prompt it was accepted with even if that prompt is
evicted, unloaded or replaced meanwhile.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..artifact import MAX_PROMPT_FILE_BYTES, LoadedPrompt, PromptMeta, check_compatible, prompt_bytes, prompt_from_bytes
from ..data import TaskSpec
from ..errors import ConfigError, DataError, PromptFileError
from ..methods import METHODS
from ..model import PromptedModel
from ..prefix import PrefixKV
from ..tasks import task
from .config import EngineConfig
from .errors import CacheTooSmallError, InvalidRequestError, UnknownPromptError, UploadTooLargeError
from .jobs import Row
from .limits import check_label_ids, check_label_names, check_unicode
from .prefill import PrefixSlot, fill_slots
from .prefix_cache import MB, ByteLRU, default_limit_bytes, free_memory, model_bytes, tensor_bytes, token_kv_bytes
from .prefix_spill import SpillStats, open_spill
from .store import PromptFolder, check_name

WARM_AT_START = 64
"""Prompt files read and checked at start-up (their prefixes still computed on first use; the
rest read on first use): a small folder behaves as before (every prompt listed as loaded, a broken
file a start-up error) and a large one starts in a second."""
SHOWN_NAMES = 20
"""An unknown-prompt error lists the known names when there are at most this many."""


@dataclass(frozen=True)
class PromptEntry:
    """A prompt as served: tensor, metadata, task spec, key/value prefix and (classify) label tokens."""

    name: str
    tensor: torch.Tensor  # as stored, on the model's device: (P, d) float32, or a deep prompt's
    # (layers, 2, kv_heads, P, head_dim) in the model's dtype (its prefix's layers are views of it)
    meta: PromptMeta
    spec: TaskSpec
    slot: PrefixSlot  # per layer (H, P, hd) once filled
    label_ids: tuple[tuple[int, ...], ...] | None
    source: str  # "file", "upload" or "memory"

    @property
    def prefix(self) -> PrefixKV:
        """The key/value prefix (RuntimeError until the worker has computed it)."""
        return self.slot.get()

    @property
    def length(self) -> int:
        return self.slot.length

    def describe(self) -> dict:
        """Public facts about the prompt (for listings)."""
        return {
            "name": self.name, "task": self.spec.kind, "length": self.length, "labels": self.spec.labels,
            "template": self.spec.template, "base_model": self.meta.base_model, "source": self.source,
            "training": self.meta.training, "method": self.meta.method, "shape": list(self.tensor.shape),
        }


@dataclass(frozen=True)
class StoreStats:
    """What ``/metrics`` shows of the store."""

    known: int  # prompts usable by name (indexed in the folder, or resident)
    resident: int
    bytes: int
    limit: int
    hits: int
    misses: int
    evictions: int
    load_seconds: float  # reading, parsing and checking prompt files and uploads
    prefill_seconds: float  # computing input prompts' key/value prefixes
    prefills: int  # prefixes computed
    spill: SpillStats = SpillStats()  # the prefixes on disk (--prefix-spill-mb)


def entry_bytes(entry: PromptEntry, token_bytes: int) -> int:
    """Bytes an entry holds: its tensor and prefix (storages counted once), the prefix reckoned
    from its length while it is not computed yet."""
    if entry.slot.filled:
        return tensor_bytes(entry.tensor, *(t for kv in entry.prefix.layers for t in kv))
    return tensor_bytes(entry.tensor) + token_bytes * entry.length


def task_of(name: str, meta: PromptMeta, tokenizer, limits: EngineConfig | None,
            max_spec_length: int) -> tuple[TaskSpec, tuple[tuple[int, ...], ...] | None]:
    """A prompt's task spec and (classify) label tokens, its own strings checked against the
    server's limits; raises :class:`PromptFileError` naming the prompt."""
    try:
        spec = TaskSpec.from_meta(meta, max_length=max_spec_length)
        # the file's own strings go to the tokenizer: refuse what it cannot take, and labels
        # beyond the server's limits, now rather than on every request
        check_unicode(spec.template, "its template")
        for what, words in (("its labels", spec.labels or []), ("its verbalized labels", spec.words)):
            if limits is not None:
                check_label_names(words, limits, what)
            for i, w in enumerate(words):
                check_unicode(w, f"{what}[{i}]")
        ids = task(spec.kind).label_ids(spec, tokenizer)  # None: a kind without a label set
        label_ids = None if ids is None else tuple(tuple(i) for i in ids)
        if label_ids is not None and limits is not None:
            check_label_ids(label_ids, limits, "its labels")
    except (DataError, InvalidRequestError) as e:
        raise PromptFileError(f"prompt {name!r}: {e}") from None
    return spec, label_ids


def prefix_slot(pm: PromptedModel, name: str, loaded: LoadedPrompt, prefixer=None) -> tuple[torch.Tensor, PrefixSlot]:
    """The prompt's tensor as served and its prefix slot: filled for a deep prompt (its stored
    keys/values are the prefix) and for the vLLM backend (``prefixer`` makes its rows; it refuses
    deep prompts), left to compute for an input prompt."""
    meta = loaded.meta
    if prefixer is not None:
        tensor = loaded.tensor.to(pm.base.device)
        return tensor, PrefixSlot(meta.length, value=prefixer(name, tensor, meta))
    tensor, stored = METHODS[meta.method].serve(pm, loaded.tensor)  # a deep prompt's keys/values are stored
    if stored is not None:
        return tensor, PrefixSlot(meta.length, value=stored)
    return tensor, PrefixSlot(meta.length, prompt=tensor)  # computed from the tensor on first use


class PromptBank:
    """Named prompts on one frozen base model.

    Args:
        pm: the prompted base model.
        directory: folder of ``<name>.safetensors`` files, nested folders being namespaces (None: uploads only).
        strict: refuse prompts whose base-model fingerprint differs (see ``check_compatible``).
        max_spec_length: ``TaskSpec.max_length`` used to render sources.
        model_lock: held while a prefix is computed (the engine holds it while running batches).
        limits: the server's limits (``--max-labels``, ``--max-label-tokens``,
            ``--max-prompt-tokens``, ``--prefix-cache-mb``); None: defaults, no label limits.
        prefixer: ``(name, tensor, meta) -> PrefixKV`` when another process runs the model
            (``--backend vllm``): the bank then never runs the model; None: compute the prefix here.
        durable: uploads are written to ``directory`` (atomically, fsynced) and deletions remove the
            file; False: uploads live in memory only (``--ephemeral-uploads``) and a deletion only
            forgets the prompt until it is loaded again.
    """

    def __init__(self, pm: PromptedModel, directory: str | Path | None = None, *, strict: bool = True,
                 max_spec_length: int = 4096, model_lock: threading.Lock | None = None,
                 limits: EngineConfig | None = None, prefixer=None, durable: bool = False):
        self.pm = pm
        self.folder = PromptFolder(directory) if directory is not None else None
        self.strict = strict
        self.max_spec_length = max_spec_length
        self._lock = threading.Lock()
        self._model_lock = model_lock or nullcontext()
        self.limits = limits
        self.prefixer = prefixer
        self.durable = durable and self.folder is not None
        mb = limits.prefix_cache_mb if limits is not None else None
        limit = int(mb * MB) if mb else default_limit_bytes(model_bytes(pm), free_memory(pm.base.device))
        self._cache: ByteLRU[PromptEntry] = ByteLRU(limit)
        self._index: set[str] = set()  # names of the folder's files, usable without a load
        self._unloaded: set[str] = set()  # unloaded while their file stays: not used until loaded again
        self._version: dict[str, int] = {}  # bumped by every explicit change of a name
        self._load_s, self._prefill_s, self._prefills = 0.0, 0.0, 0
        self.token_bytes = token_kv_bytes(pm, prefixer)
        if self.token_bytes > limit:
            raise ConfigError(f"--prefix-cache-mb {limit / MB:g} is smaller than the key/value prefix of a single "
                              f"virtual token ({self.token_bytes / MB:.3f} MB)")
        self.spill = open_spill(pm, limits, prefixer)  # prefixes on disk (--prefix-spill-mb; off: one that keeps none)

    # -- reading

    def get(self, name: str) -> PromptEntry:
        """The entry called ``name``, read from its file on first use or after eviction; raises
        :class:`UnknownPromptError`, or :class:`PromptFileError` for a file found corrupt then."""
        with self._lock:
            entry = self._cache.get(name)
            indexed = name in self._index
            unloaded = name in self._unloaded
            version = self._version.get(name, 0)
        if entry is not None:
            return entry
        if not indexed and not unloaded and self.folder is not None and self.folder.exists(name):
            indexed = True  # a file copied into the folder after start-up
            with self._lock:
                self._index.add(name)
        if not indexed:
            raise UnknownPromptError(f"unknown prompt {name!r}; loaded: {self._known_names()}")
        try:
            return self._read(name, lazy=True, version=version)
        except UnknownPromptError:  # its file was removed behind the server's back: forget the name
            with self._lock:
                if self._version.get(name, 0) == version:
                    self._index.discard(name)
            raise

    def names(self) -> list[str]:
        """Every usable prompt name: resident, or indexed in the folder."""
        with self._lock:
            return sorted(self._index.union(self._cache.keys()))

    def entries(self) -> list[PromptEntry]:
        """The resident prompts (not those only indexed)."""
        with self._lock:
            return [self._cache.peek(n) for n in sorted(self._cache.keys())]

    def available(self) -> list[str]:
        """Names of the folder's files that are not resident (usable by name all the same); the
        folder is listed again, so files copied in or removed since start-up are seen (a name
        that is no prompt name is left out here; at start-up it is an error)."""
        names = self.folder.index(strict=False) if self.folder is not None else None
        with self._lock:
            if names is not None:
                self._index = set(names).difference(self._unloaded)
            return sorted(self._index.difference(self._cache.keys()))

    def stats(self) -> StoreStats:
        with self._lock:
            c = self._cache
            return StoreStats(len(self._index.union(c.keys())), len(c), c.bytes, c.limit, c.stats.hits,
                              c.stats.misses, c.stats.evictions, self._load_s, self._prefill_s, self._prefills, self.spill.stats())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._index or name in self._cache

    def _known_names(self) -> str:
        names = self.names()
        return (", ".join(names) or "none") if len(names) <= SHOWN_NAMES else f"{len(names)} prompts (GET /v1/prompts lists them)"

    # -- the worker's batched prefill

    def fill(self, rows: Sequence[Row]) -> None:
        """Compute the missing prefixes of ``rows`` in one batched pass per prompt length and set
        each row's ``prefix`` (the scheduler calls this on the worker thread before a step)."""
        self._fill([r.slot for r in rows if r.slot is not None])
        for r in rows:
            if r.slot is not None:
                r.prefix = r.slot.get()

    # -- loading

    def path_of(self, name: str) -> Path:
        """``<directory>/<name>.safetensors``; the name cannot leave the directory."""
        check_name(name)
        if self.folder is None:
            raise UnknownPromptError(f"no prompts folder to load {name!r} from (start the server with --prompts)")
        return self.folder.path_of(name)

    def load_all(self, warm: int = WARM_AT_START) -> list[str]:
        """Index every prompt file of the folder (nested folders are namespaces) without reading
        it, and read and check the first ``warm`` of them now (while they fit the cache; their
        prefixes are computed by the worker on first use); returns the names.
        Raises :class:`PromptFileError` for a file name that is no prompt name or a symlink out of
        the folder, :class:`ConfigError` when the cache cannot hold the first prompt's prefix."""
        if self.folder is None:
            return []
        names = self.folder.index()
        with self._lock:
            self._index.update(names)
        for name in names[:warm]:
            try:
                self._read(name, lazy=True)
            except CacheTooSmallError as e:
                raise ConfigError(f"--prefix-cache-mb is too small for the prompts folder: {e}") from None
            if self._cache.stats.evictions:
                break
        return names

    def load_file(self, name: str) -> PromptEntry:
        """(Re)load ``<directory>/<name>.safetensors`` now (prefix computed here)."""
        self.path_of(name)
        return self._read(name, lazy=False)

    def load_bytes(self, name: str, data: bytes, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> PromptEntry:
        """(Re)load a prompt from uploaded prompt-file bytes: checked, its prefix computed, then
        written to the folder when the bank is ``durable`` (else kept in memory only)."""
        check_name(name)
        if len(data) > max_bytes:
            raise UploadTooLargeError(f"upload of {len(data)} bytes is larger than --max-upload-bytes {max_bytes}")
        start = time.perf_counter()
        loaded = prompt_from_bytes(data, f"upload {name!r}")
        check_compatible(loaded.meta, self.pm.base, f"upload {name!r}", strict=self.strict)
        entry = self._entry(name, loaded, "upload", lazy=False, start=start)
        if self.durable:
            self.folder.write(name, data)
        return self._put(entry, pinned=not self.durable, indexed=self.durable)

    def add_tensor(self, name: str, tensor: torch.Tensor, meta: PromptMeta) -> PromptEntry:
        """Add an in-memory prompt with its metadata (checked like a file): (P, d), or a deep
        prompt (layers, 2, kv_heads, P, head_dim) for ``meta.method`` "prefix"."""
        check_name(name)
        start = time.perf_counter()
        loaded = prompt_from_bytes(prompt_bytes(tensor, replace(meta), "float32"), f"prompt {name!r}")  # as a file would be
        check_compatible(loaded.meta, self.pm.base, f"prompt {name!r}", strict=self.strict)
        return self._put(self._entry(name, loaded, "memory", lazy=False, start=start), pinned=True, indexed=False)

    def unload(self, name: str) -> None:
        """Forget a prompt (a ``durable`` bank also deletes its file); requests already accepted
        for it still complete."""
        check_name(name)
        removed = self.durable and self.folder.remove(name)
        with self._lock:
            resident = self._cache.pop(name) is not None
            indexed = name in self._index
            self._index.discard(name)
            if not removed:
                self._unloaded.add(name)
            self._version[name] = self._version.get(name, 0) + 1
        if not (resident or indexed or removed):
            raise UnknownPromptError(f"unknown prompt {name!r}; loaded: {self._known_names()}")

    # -- internals

    def _read(self, name: str, *, lazy: bool, version: int | None = None) -> PromptEntry:
        """Read, parse and check the file of ``name`` (bytes read once), make its entry (an input
        prompt's prefix left to the worker when ``lazy``) and cache it, unless the name changed
        meanwhile (``version``: the entry then serves this request only)."""
        start = time.perf_counter()
        data = self.folder.read(name)
        where = str(self.folder.path_of(name))
        loaded = prompt_from_bytes(data, where)
        check_compatible(loaded.meta, self.pm.base, where, strict=self.strict)
        entry = self._entry(name, loaded, "file", lazy=lazy, start=start)
        return self._put(entry, pinned=False, indexed=True, version=version)

    def _entry(self, name: str, loaded: LoadedPrompt, source: str, *, lazy: bool, start: float) -> PromptEntry:
        meta = loaded.meta
        limit = self.limits.max_prompt_tokens if self.limits is not None else None
        if limit is not None and meta.length > limit:
            raise UploadTooLargeError(f"prompt {name!r} has {meta.length} virtual tokens, more than --max-prompt-tokens {limit}")
        spec, label_ids = task_of(name, meta, self.pm.base.tokenizer, self.limits, self.max_spec_length)
        with self._lock:
            self._load_s += time.perf_counter() - start
        tensor, slot = prefix_slot(self.pm, name, loaded, self.prefixer)
        self.spill.restore(slot)  # an input prompt's prefix read back from disk, or marked to be written there
        if not lazy:  # an explicit load computes it now (off the worker thread)
            self._fill([slot])
        return PromptEntry(name, tensor, meta, spec, slot, label_ids, source)

    def _fill(self, slots: Sequence[PrefixSlot]) -> None:
        """Compute the empty ``slots``' prefixes under the model lock, counting the time."""
        if all(s.filled for s in slots):
            return
        start = time.perf_counter()
        with self._model_lock:
            n = fill_slots(self.pm, slots)
        with self._lock:
            self._prefill_s += time.perf_counter() - start
            self._prefills += n
        self.spill.save(slots)  # queued for the spill's writer, outside the model lock

    def _put(self, entry: PromptEntry, *, pinned: bool, indexed: bool, version: int | None = None) -> PromptEntry:
        """Cache ``entry`` (an explicit change: ``version`` None) and return it."""
        nbytes, name = entry_bytes(entry, self.token_bytes), entry.name
        with self._lock:
            limit = self._cache.limit
            if nbytes > limit:
                raise CacheTooSmallError(f"prompt {name!r}: its prefix takes {nbytes / MB:.2f} MB, more than "
                                      f"--prefix-cache-mb {limit / MB:g}")
            if version is not None and self._version.get(name, 0) != version:
                return entry  # replaced, reloaded or deleted while it was read: serve this request, cache nothing
            pinned_bytes = self._cache.pinned_bytes - (self._cache.nbytes(name) if name in self._cache.pinned else 0)
            if pinned and pinned_bytes + nbytes > limit:
                raise UploadTooLargeError(
                    f"prompt {name!r}: in-memory prompts would take more than --prefix-cache-mb {limit / MB:g}; "
                    "delete some, or keep uploads on disk (without --ephemeral-uploads)")
            self._cache.put(name, entry, nbytes, pinned=pinned)
            if indexed:
                self._index.add(name)
            if version is None:
                self._version[name] = self._version.get(name, 0) + 1
                self._unloaded.discard(name)
        return entry
