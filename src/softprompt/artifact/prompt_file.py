"""The prompt file: one ``.safetensors`` file with the prompt tensor and JSON metadata.

Layout:
    tensor  "prompt"        (P, d): an input prompt (method "prompt"), format_version 1
    tensor  "prefix"        (layers, 2, kv_heads, P, head_dim): a deep prompt (method "prefix"),
                            per layer its keys ([:, 0]) and values ([:, 1]) as the attention cache
                            holds them (keys after the rotary embedding); format_version 2
    header  "format_version" "1" or "2"
    header  "softprompt"     JSON of :class:`PromptMeta`

The tensor's name, shape and format version are the method's (``softprompt.methods``).
Tensors are float16 by default (bfloat16 if values overflow float16). An input prompt is still
written as format 1, byte for byte as before (so older softprompt versions read it); format 2 adds
``method`` and ``kv_layout`` to the metadata, and format-1 files load as ``method="prompt"``.

safetensors is data only: loading a prompt file cannot run code. Files are written atomically
(temp file + fsync + rename), so a crash never leaves a half-written prompt behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..calibration import Calibration, CalibrationError

from ..version import __version__
from ..base import BaseModel, sketch_similarity
from ..errors import PromptFileError
from ..methods import METHODS, method
from ..tasks import TASK_KINDS, TaskKind
from .metadata_checks import MAX_META_DEPTH, STORAGE_DTYPE_NAMES, check_fields as _check_fields, depth as _depth

FORMAT_VERSION = 2
"""The newest prompt-file format this version reads and writes."""
MAX_PROMPT_FILE_BYTES = 256 * 1024 * 1024
STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}
TaskType = TaskKind
TASK_TYPES = TASK_KINDS


@dataclass
class PromptMeta:
    """Everything a prompt file says about its prompt besides the tensor."""

    base_model: str
    """Name of the base model it was trained on (hub id, path, or the embedded default's name)."""
    fingerprint: str
    """Hash of the base model's input embedding matrix (see ``base.embedding_fingerprint``)."""
    length: int
    """P, number of virtual tokens."""
    dim: int
    """d, embedding width of the base model."""
    task: TaskType | None = None
    """"classify" or "generate"; None for a prompt not tied to a task yet."""
    template: str | None = None
    """Where the input goes, e.g. "Text: {text}\\nTopic:"."""
    labels: list[str] | None = None
    """Class labels (classification), in score order."""
    verbalizer: dict[str, str] | None = None
    """Label -> the words the model must produce (default: the label itself)."""
    name: str | None = None
    """A short name for the task, e.g. "topic"."""
    sketch: list[float] = field(default_factory=list)
    """Fingerprint sketch, to tell a differently quantized copy of the base model from another model."""
    dtype: str = "float16"
    """Storage dtype of the tensor."""
    training: dict[str, Any] = field(default_factory=dict)
    """Summary of how it was trained (steps, data, metrics...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form fields (import provenance, ...)."""
    method: str = "prompt"
    """A key of :data:`softprompt.methods.METHODS`: "prompt" (input prompt) or "prefix" (deep prompt)."""
    kv_layout: list[int] | None = None
    """Deep prompts: [layers, kv_heads, head_dim] of the base model's attention cache."""
    calibration: dict[str, Any] | None = None
    """Label-score calibration fitted on dev (``softprompt.calibration``); None: none."""
    created: str = ""
    softprompt_version: str = __version__
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_base(cls, base: BaseModel, length: int, **kw: Any) -> "PromptMeta":
        """Metadata pre-filled with ``base``'s name, fingerprint and width."""
        return cls(base_model=base.name, fingerprint=base.fingerprint, sketch=base.sketch,
                   length=length, dim=base.dim, **kw)


@dataclass
class LoadedPrompt:
    """A prompt read from disk: float32 tensor plus its metadata. The tensor is (P, d) for an
    input prompt, (layers, 2, kv_heads, P, head_dim) for a deep prompt (``meta.method``)."""

    tensor: torch.Tensor
    meta: PromptMeta
    path: Path | None = None


def _storage_dtype(tensor: torch.Tensor, dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise PromptFileError(f"unknown prompt dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    if dtype == "float16" and tensor.abs().max().item() > torch.finfo(torch.float16).max:
        return "bfloat16"  # values too large for float16: keep the range, lose some mantissa
    return dtype


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (``mkstemp`` gives 0o600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    The file gets the mode a plain write would give it (an existing file's mode, else 0o666 less
    the umask), not the temp file's owner-only 0o600, so a server running as another user can
    read the prompts it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize to safetensors with a canonical header: the same content gives the same bytes.

    safetensors writes its metadata map in hash order, so two saves of one prompt differ byte for
    byte; the header is re-written with sorted keys (padded with spaces to 8 bytes, as safetensors
    does), which moves no tensor data (offsets count from the end of the header).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def _fill_shape(tensor: torch.Tensor, meta: PromptMeta) -> None:
    """Check ``tensor`` is the shape of ``meta.method`` and record it in ``meta``."""
    m = method(meta.method, error=PromptFileError)
    try:
        shape = m.measure(tensor)
    except ValueError as e:
        raise PromptFileError(str(e)) from None
    for name, value in shape.items():
        setattr(meta, name, value)


def tensor_shape(meta: PromptMeta) -> tuple[int, ...]:
    """The prompt tensor's shape its metadata says: (P, d), or (layers, 2, kv_heads, P, head_dim)."""
    try:
        return method(meta.method, error=PromptFileError).shape(meta)
    except ValueError as e:
        raise PromptFileError(str(e)) from None


def shape_words(meta: PromptMeta) -> str:
    """The prompt's shape for people, e.g. "deep prompt: 24 layers x 2 x 3 kv heads x 20 virtual tokens x 64 dims"."""
    return method(meta.method, error=PromptFileError).shape_words(meta)


def prompt_bytes(tensor: torch.Tensor, meta: PromptMeta, dtype: str = "float16") -> bytes:
    """Serialize a prompt and its metadata to prompt-file bytes: an input prompt (P, d), or a deep
    prompt (layers, 2, kv_heads, P, head_dim) (``meta.method`` "prefix")."""
    _fill_shape(tensor, meta)
    if not torch.isfinite(tensor).all():
        raise PromptFileError("refusing to save a prompt with NaN or infinite values")
    dtype = _storage_dtype(tensor, dtype)
    meta.dtype = dtype
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta.format_version = METHODS[meta.method].format_version
    fields_ = asdict(meta)
    if meta.format_version == 1:  # byte for byte the format-1 file older versions read
        del fields_["method"], fields_["kv_layout"]
    if meta.calibration is None:  # byte for byte the file a version without calibration writes
        del fields_["calibration"]
    header = {"format_version": str(meta.format_version), "softprompt": json.dumps(fields_, sort_keys=True)}
    data = tensor.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
    return safetensors_bytes({METHODS[meta.method].tensor_name: data}, header)


def save_prompt(path: str | os.PathLike, tensor: torch.Tensor, meta: PromptMeta, dtype: str = "float16") -> Path:
    """Write a prompt file atomically and return its path.

    Args:
        path: destination ``.safetensors`` file.
        tensor: the prompt: (P, d) (a :class:`~softprompt.prompt.SoftPrompt`'s ``weight``), or
            (layers, 2, kv_heads, P, head_dim) for a deep prompt (``meta.method`` "prefix").
        meta: its metadata; the shape fields and ``dtype`` are filled from the tensor.
        dtype: storage dtype: "float16" (default), "bfloat16" or "float32".
    """
    atomic_write_bytes(path, prompt_bytes(tensor, meta, dtype))
    return Path(path)


def _meta_from_header(header: dict[str, str], where: str) -> PromptMeta:
    if "format_version" not in header or "softprompt" not in header:
        raise PromptFileError(f"{where}: not a softprompt prompt file (no softprompt metadata)")
    try:
        version = int(header["format_version"])
    except ValueError:
        raise PromptFileError(f"{where}: bad format_version {header['format_version']!r}") from None
    if version > FORMAT_VERSION:
        raise PromptFileError(
            f"{where}: prompt file format {version} is newer than this softprompt supports "
            f"({FORMAT_VERSION}); upgrade softprompt"
        )
    if version < 1:
        raise PromptFileError(f"{where}: bad format_version {version}")
    try:
        raw = json.loads(header["softprompt"])
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: corrupt metadata ({e.msg})") from None
    except RecursionError:
        raise PromptFileError(f"{where}: metadata nested deeper than {MAX_META_DEPTH} levels") from None
    if not isinstance(raw, dict):
        raise PromptFileError(f"{where}: corrupt metadata (not a JSON object)")
    if _depth(raw) > MAX_META_DEPTH:
        raise PromptFileError(f"{where}: metadata nested deeper than {MAX_META_DEPTH} levels")
    known = {f.name for f in fields(PromptMeta)}
    missing = [k for k in ("base_model", "fingerprint", "length", "dim") if k not in raw]
    if missing:
        raise PromptFileError(f"{where}: metadata lacks {', '.join(missing)}")
    _check_fields(raw, where)
    try:
        meta = PromptMeta(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise PromptFileError(f"{where}: corrupt metadata ({e})") from None
    if meta.task is not None and meta.task not in TASK_TYPES:
        raise PromptFileError(f"{where}: unknown task type {meta.task!r}")
    if version < method(meta.method, where, PromptFileError).format_version:
        held = " or ".join(m.a for m in METHODS.values() if m.format_version <= version)
        raise PromptFileError(f"{where}: a format-{version} file can only hold {held}, metadata says {meta.method!r}")
    if meta.calibration is not None:
        try:
            Calibration.from_meta(meta.calibration, meta.labels)
        except CalibrationError as e:
            raise PromptFileError(f"{where}: {e}") from None
    meta.format_version = version
    return meta


def read_safetensors(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of safetensors bytes (data only: nothing executes); raises
    :class:`PromptFileError` naming ``where`` when they are truncated or not safetensors.
    The one reader of prompt files and PEFT adapters."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise PromptFileError(f"{where}: truncated or empty file ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise PromptFileError(f"{where}: truncated or corrupt file (header says {header_len} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        if not isinstance(header, dict) or not all(isinstance(v, str) for v in header.values()):
            raise ValueError("__metadata__ must map names to strings")
        tensors = load(data)
    except RecursionError:
        raise PromptFileError(f"{where}: not a valid safetensors file (header nested too deep)") from None
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PromptFileError(f"{where}: not a valid safetensors file ({msg})") from None
    return tensors, header


def prompt_from_bytes(data: bytes, where: str = "prompt file") -> LoadedPrompt:
    """Parse prompt-file bytes (no base-model check); raises :class:`PromptFileError`."""
    tensors, header = read_safetensors(data, where)
    meta = _meta_from_header(header, where)
    m = METHODS[meta.method]
    name = m.tensor_name
    if set(tensors) != {name}:
        raise PromptFileError(f"{where}: expected one tensor named {name!r}, found {sorted(tensors) or 'none'}")
    t = tensors[name]
    try:
        want = m.shape(meta)  # (P, d), or (layers, 2, kv_heads, P, head_dim)
    except ValueError as e:
        raise PromptFileError(f"{where}: {e}") from None
    if tuple(t.shape) != want:
        raise PromptFileError(f"{where}: {name} tensor has shape {tuple(t.shape)} but metadata says {want}")
    if t.dtype not in STORAGE_DTYPES.values():
        raise PromptFileError(f"{where}: {name} tensor is {str(t.dtype).removeprefix('torch.')}; a prompt file holds "
                              f"{', '.join(STORAGE_DTYPES)}")
    if not torch.isfinite(t).all():
        raise PromptFileError(f"{where}: prompt tensor holds non-finite or non-float values")
    return LoadedPrompt(t.to(torch.float32), meta)


def check_compatible(meta: PromptMeta, base: BaseModel, where: str = "prompt file", strict: bool = True) -> None:
    """Raise :class:`PromptFileError` if a prompt does not belong to ``base``.

    With ``strict=False`` a fingerprint mismatch is accepted when the dimensions agree (for a
    deliberately re-quantized or converted copy of the same model). A base whose ``kv_layout`` is
    None (a front end holding only the embedding table) cannot check a deep prompt's layout.
    """
    if meta.dim != base.dim:
        raise PromptFileError(
            f"{where}: prompt width {meta.dim} does not match base model {base.name!r} (width {base.dim}); "
            f"it was trained for {meta.base_model!r}"
        )
    why = method(meta.method, where, PromptFileError).base_mismatch(meta, base)
    if why is not None:
        raise PromptFileError(f"{where}: {why}; it was trained for {meta.base_model!r}")
    if meta.fingerprint == base.fingerprint or not strict:
        return
    sim = sketch_similarity(meta.sketch, base.sketch)
    hint = (
        f" (embedding similarity {sim:.3f}: looks like a differently quantized copy of the same model; "
        "pass --allow-other-base / strict=False to use it anyway)"
        if sim > 0.95
        else ""
    )
    raise PromptFileError(
        f"{where}: trained for base model {meta.base_model!r} (fingerprint {meta.fingerprint[:12]}), "
        f"not {base.name!r} (fingerprint {base.fingerprint[:12]}){hint}"
    )


def load_prompt(path: str | os.PathLike, base: BaseModel | None = None, *, strict: bool = True) -> LoadedPrompt:
    """Read a prompt file; if ``base`` is given, check it belongs to that model.

    Raises:
        PromptFileError: missing, too large, truncated/corrupt, unknown version, or wrong model;
            the message names the file and the problem.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"{p}: no such prompt file")
    size = p.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"{p}: {size} bytes is too large for a prompt file")
    loaded = prompt_from_bytes(p.read_bytes(), str(p))
    loaded.path = p
    if base is not None:
        check_compatible(loaded.meta, base, str(p), strict=strict)
    return loaded
