"""The prefix spill: a second, larger tier under the prefix cache, on disk. An input prompt's
key/value prefix costs a forward pass of its P virtual tokens on the model thread (about one
request's worth of compute); once computed it is written here, so that after the prompt is evicted
from memory its next use reads the prefix back (a file of about 1 MB) instead of computing it again.
Deep prompts need no spill: their file is their prefix.

A file is named by a digest of everything the prefix depends on (:func:`prefix_key`): the prompt
tensor's bytes, shape and dtype, and the model (:func:`model_digest`: the base fingerprint, the
config, samples of every weight, the compute dtype and device type, torch / transformers /
softprompt versions). A replaced prompt or another model therefore never finds a stale prefix,
and a folder kept across restarts is safe. Files are safetensors (no pickle) written to a temp
name and renamed; a checksum of the tensors in the header catches a torn or damaged file, which
is a miss (deleted, one log line), never an error. Bounded in bytes: the least recently used files
are deleted. Writes run on a thread of their own (never under the model lock, never on the
worker); a failed write (disk full, read-only folder) is logged once and serving goes on.

Not here: the in-memory tier (prefix_cache.py), computing prefixes (prefill.py), when entries are
made (bank.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import transformers

from ..errors import ConfigError
from ..prefix import PrefixKV
from ..version import __version__
from .prefill import PrefixSlot
from .prefix_cache import MB, token_kv_bytes

log = logging.getLogger("softprompt.serve.spill")

SPILL_FORMAT = 1
"""Layout of a spill file; part of every key, so a new layout never reads an old file."""
WEIGHT_SAMPLES = 1024
"""Values sampled (evenly strided) from each weight tensor for :func:`model_digest`: any change of
the weights (another checkpoint, a fine-tune with the same embeddings) changes the digest."""
WRITE_QUEUE = 256
"""Prefixes waiting to be written; beyond that a prefix is not spilled (counted as dropped)."""
STALE_TEMP_S = 600
"""Temp files older than this found at start-up are leftovers of a crash, deleted."""


class SpillFileError(Exception):
    """A spill file that cannot be used (torn, damaged, or not the prefix its name says)."""


@dataclass(frozen=True)
class SpillStats:
    """What ``/metrics`` shows of the spill (all zero when it is off)."""

    files: int = 0
    bytes: int = 0
    limit: int = 0
    hits: int = 0
    misses: int = 0
    writes: int = 0
    evictions: int = 0
    errors: int = 0  # bad files found, failed writes
    dropped: int = 0  # not written: the write queue was full
    read_seconds: float = 0.0


@torch.no_grad()
def model_digest(pm) -> str:
    """A digest of what an input prompt's prefix depends on besides the prompt: the model's
    fingerprint, config (its location left out), a strided sample of every weight, the compute
    dtype and device type, and the versions of the code that computes it."""
    lm = pm.lm
    h = hashlib.sha256(f"spill {SPILL_FORMAT} softprompt {__version__} torch {torch.__version__}".encode())
    config = {k: v for k, v in lm.config.to_dict().items() if k != "_name_or_path"}
    h.update(f" transformers {transformers.__version__} {pm.base.fingerprint} {lm.dtype} {pm.base.device.type}".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(getattr(lm.config, "_attn_implementation", None)).encode())
    for name, p in lm.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // WEIGHT_SAMPLES)][:WEIGHT_SAMPLES].contiguous().cpu()
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prefix_key(model: str, prompt: torch.Tensor) -> str:
    """The spill key (64 hex digits) of input prompt ``prompt`` (P, d) on the model of digest ``model``."""
    t = prompt.detach().contiguous().cpu()
    h = hashlib.sha256(f"{model} {tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checksum(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prefix_bytes(key: str, prefix: PrefixKV) -> bytes:
    """A prefix as a safetensors file: ``k.I`` / ``v.I`` (H, P, hd) per layer, with its key,
    length and a checksum of the tensors in the header."""
    from safetensors.torch import save

    tensors = {}
    for i, (k, v) in enumerate(prefix.layers):
        tensors[f"k.{i}"], tensors[f"v.{i}"] = k.detach().cpu().clone(), v.detach().cpu().clone()  # own storage each
    ordered = [tensors[f"{kv}.{i}"] for i in range(len(prefix.layers)) for kv in "kv"]
    meta = {"format": str(SPILL_FORMAT), "key": key, "length": str(prefix.length), "layers": str(len(prefix.layers)),
            "checksum": _checksum(ordered)}
    return save(tensors, metadata=meta)


def prefix_from_bytes(data: bytes, key: str, length: int, device: torch.device) -> PrefixKV:
    """The prefix stored in ``data`` (the file of ``key``), on ``device``; raises
    :class:`SpillFileError` when it is torn, damaged or another prefix."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise SpillFileError(f"not a readable safetensors file ({e})") from None
    if meta.get("format") != str(SPILL_FORMAT) or meta.get("key") != key or meta.get("length") != str(length):
        raise SpillFileError("its header names another prefix")
    layers = int(meta.get("layers", "-1"))
    names = [f"{kv}.{i}" for i in range(layers) for kv in "kv"]
    if layers < 1 or sorted(names) != sorted(tensors):
        raise SpillFileError("its tensors are not a prefix's")
    ordered = [tensors[n] for n in names]
    if any(t.dim() != 3 or t.shape[1] != length for t in ordered) or _checksum(ordered) != meta.get("checksum"):
        raise SpillFileError("its tensors do not match its checksum")
    return PrefixKV(tuple((tensors[f"k.{i}"].to(device), tensors[f"v.{i}"].to(device)) for i in range(layers)), length)


class PrefixSpill:
    """Computed input-prompt prefixes on disk, least recently used deleted past ``limit`` bytes.

    Args:
        directory: the folder (created if missing); None: a temporary folder removed at exit (or
            at :meth:`close`).
        limit: bytes of files kept.
        model: :func:`model_digest` of the model whose prefixes these are.
        device: where prefixes read back go.

    Thread-safe: :meth:`restore` runs where entries are made (request threads), :meth:`save` on
    the worker, the writes on a thread of the spill's own.
    """

    def __init__(self, directory: str | Path | None, limit: int, model: str, device: torch.device):
        self.temporary = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="softprompt-spill-") if directory is None else directory)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True) if self.temporary else None
        self.limit, self.model, self.device = limit, model, device
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._bytes = self._hits = self._misses = self._writes = self._evictions = self._errors = self._dropped = 0
        self._read_s = 0.0
        self._warned = self._closed = False
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        self._scan()

    # -- the bank's two hooks

    def restore(self, slot: PrefixSlot) -> bool:
        """Fill an input prompt's empty ``slot`` from its file if there is one (True); else mark
        the slot to be spilled once computed. Slots already filled (deep prompts) are left alone."""
        if slot.filled or slot.prompt is None:
            return False
        key = prefix_key(self.model, slot.prompt)
        prefix = self.get(key, slot.length)
        if prefix is None:
            slot.spill_key = key
            return False
        slot.fill(prefix)
        return True

    def save(self, slots: Sequence[PrefixSlot]) -> None:
        """Queue the computed prefixes of ``slots`` marked by :meth:`restore` for writing (no I/O here)."""
        for s in slots:
            key = s.spill_key
            if key is None or not s.filled or self._closed:
                continue
            s.spill_key = None
            if self._writer is None:
                with self._lock:
                    if self._writer is None:
                        self._writer = threading.Thread(target=self._write_loop, name="prefix-spill", daemon=True)
                        self._writer.start()
            try:
                self._queue.put_nowait((key, s.get()))
            except queue.Full:
                with self._lock:
                    self._dropped += 1

    # -- the store

    def get(self, key: str, length: int) -> PrefixKV | None:
        """The prefix of ``key`` (P = ``length``) read back, or None (a miss: no file, or a bad one, deleted)."""
        with self._lock:
            known = key in self._files
            if not known:
                self._misses += 1
        if not known:
            return None
        start, path = time.perf_counter(), self._path(key)
        try:
            prefix = prefix_from_bytes(path.read_bytes(), key, length, self.device)
        except (OSError, SpillFileError) as e:
            with self._lock:
                self._bytes -= self._files.pop(key, 0)
                self._misses += 1
                self._errors += not isinstance(e, FileNotFoundError)
            if not isinstance(e, FileNotFoundError):
                log.warning("prefix spill file %s is unusable (%s); deleted, the prefix is computed again", path, e)
                _unlink(path)
            return None
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
            self._hits += 1
            self._read_s += time.perf_counter() - start
        try:
            os.utime(path)  # recency survives a restart (the scan orders files by mtime)
        except OSError:
            pass
        return prefix

    def put(self, key: str, prefix: PrefixKV) -> bool:
        """Write ``prefix`` as the file of ``key`` (temp file + rename) and delete the least recently
        used files past the limit; False when it was not written (too large, or the write failed)."""
        data = prefix_bytes(key, prefix)
        if len(data) > self.limit:
            return False
        path = self._path(key)
        # no fsync: a file torn by a crash fails its checksum and is a miss, computed again
        tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            with self._lock:
                self._errors += 1
                warn, self._warned = not self._warned, True
            if warn:
                log.warning("cannot write to the prefix spill %s (%s); serving goes on, prefixes are computed "
                            "again after eviction", self.dir, e.strerror or e)
            return False
        with self._lock:
            self._bytes += len(data) - self._files.pop(key, 0)
            self._files[key] = len(data)
            self._writes += 1
            victims = self._trim(keep=key)
        for k in victims:
            _unlink(self._path(k))
        return True

    def flush(self) -> None:
        """Wait until every queued prefix is written (tests, shutdown)."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Finish the queued writes and stop the writer; a temporary folder is removed."""
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
            self._writer = None
        if self._cleanup is not None:
            self._cleanup()

    def stats(self) -> SpillStats:
        with self._lock:
            return SpillStats(len(self._files), self._bytes, self.limit, self._hits, self._misses, self._writes,
                              self._evictions, self._errors, self._dropped, self._read_s)

    # -- internals

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _scan(self) -> None:
        """Index the files a previous run left (oldest first by mtime), delete stale temp files,
        and trim to the limit."""
        found = []
        for f in self.dir.iterdir():
            try:
                st = f.stat()
            except OSError:
                continue
            if f.name.endswith(".tmp") and _is_key(f.name[1:65]) and time.time() - st.st_mtime > STALE_TEMP_S:
                _unlink(f)  # only the spill's own temp files (".<key>.<pid>.<thread>.tmp"): the folder may hold others
            elif f.suffix == ".safetensors" and _is_key(f.stem) and f.is_file():
                found.append((st.st_mtime, f.stem, st.st_size))
        for _, key, size in sorted(found):
            self._files[key] = size
            self._bytes += size
        for k in self._trim(keep=None):
            _unlink(self._path(k))
        self._evictions = 0  # trimming a previous run's files is no eviction of this one

    def _trim(self, keep: str | None) -> list[str]:
        """Drop least recently used keys past the limit (never ``keep``); returns them. Lock held."""
        victims = []
        for k in list(self._files):
            if self._bytes <= self.limit:
                break
            if k != keep:
                self._bytes -= self._files.pop(k)
                self._evictions += 1
                victims.append(k)
        return victims

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.put(*item)
            except Exception as e:  # a bug here must not stop the writer, nor the server
                log.warning("writing a prefix to the spill failed: %r", e)
            finally:
                self._queue.task_done()


def _is_key(name: str) -> bool:
    """A spill key: 64 lowercase hex digits (the only files the spill deletes are named by one)."""
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _unlink(path: Path) -> None:
    """Delete ``path`` if it is there and can be deleted (a read-only folder keeps it: no error)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class NoSpill:
    """The spill when it is off: keeps nothing, finds nothing."""

    dir = None

    def restore(self, slot: PrefixSlot) -> bool:
        return False

    def save(self, slots: Sequence[PrefixSlot]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> SpillStats:
        return SpillStats()


def open_spill(pm, limits, prefixer=None) -> PrefixSpill | NoSpill:
    """The spill ``limits`` (an :class:`EngineConfig`) asks for, or a :class:`NoSpill`: off (no
    ``--prefix-spill-mb``), or no input prompt is prefilled in this process (``prefixer``: the
    vLLM front end). Raises :class:`ConfigError` naming the flag for a folder it cannot make or a
    budget below one virtual token's prefix."""
    mb = getattr(limits, "prefix_spill_mb", None)
    if not mb or prefixer is not None or getattr(pm, "lm", None) is None:
        return NoSpill()
    directory, limit, token = limits.prefix_spill_dir, int(mb * MB), token_kv_bytes(pm, prefixer)
    if token > limit:
        raise ConfigError(f"--prefix-spill-mb {mb:g} is smaller than the key/value prefix of a single virtual token "
                          f"({token / MB:.3f} MB)")
    if directory is not None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--prefix-spill-dir {directory}: cannot create it ({e.strerror or e})") from None
    return PrefixSpill(directory, limit, model_digest(pm), pm.base.device)
