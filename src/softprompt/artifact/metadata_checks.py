"""Checks of a prompt file's JSON metadata before anything reads it: every known field of the right
JSON type and range, and nesting bounded, so a hostile file is one PromptFileError line (never a
RecursionError, AttributeError or TypeError further in).

Not here: the tensor checks and the format versions (prompt_file.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import PromptFileError

STORAGE_DTYPE_NAMES = ("float16", "bfloat16", "float32")
"""The dtypes a prompt file stores its tensor in (prompt_file.STORAGE_DTYPES maps them to torch)."""

MAX_META_DEPTH = 32
"""Deepest nesting of lists/objects a prompt file's metadata may have (a training summary needs 4)."""
_STR, _INT = (str,), (int,)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {  # field -> (types, None allowed)
    "base_model": (_STR, False), "fingerprint": (_STR, False), "length": (_INT, False), "dim": (_INT, False),
    "task": (_STR, True), "template": (_STR, True), "labels": ((list,), True), "verbalizer": ((dict,), True),
    "name": (_STR, True), "sketch": ((list,), False), "dtype": (_STR, False), "training": ((dict,), False),
    "extra": ((dict,), False), "method": (_STR, False), "kv_layout": ((list,), True), "created": (_STR, False),
    "softprompt_version": (_STR, False), "format_version": (_INT, False),
}
"""The JSON type of every metadata field, checked before anything reads them."""


def depth(value: Any) -> int:
    """Nesting depth of JSON lists/objects (iterative: a hostile file cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if deepest > MAX_META_DEPTH:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_fields(raw: dict, where: str) -> None:
    """Every known metadata field of the right JSON type and range; raises PromptFileError (one line)."""
    for key, (types, nullable) in _FIELD_TYPES.items():
        if key not in raw or (raw[key] is None and nullable):
            continue
        v = raw[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise PromptFileError(f"{where}: metadata field {key!r} must be {' or '.join(t.__name__ for t in types)}"
                                  f"{' or null' if nullable else ''}, got {type(v).__name__}")
    if raw["length"] < 1 or raw["dim"] < 1:
        raise PromptFileError(f"{where}: metadata says {raw['length']} virtual tokens x {raw['dim']} dims; both must be at least 1")
    if raw.get("labels") is not None and not all(isinstance(l, str) and l.strip() for l in raw["labels"]):
        raise PromptFileError(f"{where}: metadata field 'labels' must be a list of non-empty strings")
    if raw.get("verbalizer") is not None and not all(isinstance(v, str) for v in raw["verbalizer"].values()):
        raise PromptFileError(f"{where}: metadata field 'verbalizer' must map labels to strings")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw.get("sketch", [])):
        raise PromptFileError(f"{where}: metadata field 'sketch' must be a list of numbers")
    if raw.get("dtype", "float16") not in STORAGE_DTYPE_NAMES:
        raise PromptFileError(f"{where}: metadata dtype {raw['dtype']!r} is not one of {', '.join(STORAGE_DTYPE_NAMES)}")
