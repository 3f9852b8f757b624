"""Namespaces and scoped API keys: the ``--api-keys`` file, what each key may use and write, and the
key ring that re-reads the file when it changes (or on SIGHUP).

A prompt name is 1-4 segments joined by '/' (``acme/ticket-routing``), each segment a name as
``store.SEGMENT`` has it; its namespace is all segments but the last (``acme``; '' for a
top-level name). A key's ``use`` and ``write`` list namespace patterns:

    "acme"      the prompts directly in acme (acme/x), not those below it (acme/team/x)
    "acme/**"   acme and every namespace below it
    ""          top-level names (no '/')
    "**"        every namespace

``write`` (upload, replace, load, unload) implies ``use``; ``admin = true`` may do everything,
including reading the metrics. The ``--api-key`` (or ``--api-key-file``, $SOFTPROMPT_API_KEY) is
an admin key.

A key is kept only as its SHA-256 digest and found by it: the lookup's timing depends on the
digest of what the client sent, which it cannot steer towards a stored one. A key never appears in
a log line or an error message; an entry is named by its ``name`` or its place (``keys[2]``).

Not here: HTTP (http/access.py applies a request's :class:`Grant` on every route).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .store import MAX_SEGMENTS, NAME_MAX, SEGMENT, namespace_of

log = logging.getLogger("softprompt.serve.keys")

SEGMENT_RE = re.compile(SEGMENT)

SUBTREE = "**"
"""The last segment of a pattern that covers a namespace and everything below it."""
FIELDS = ("name", "key", "sha256", "admin", "use", "write")
"""The fields of one ``[[keys]]`` entry."""


def digest(key: str) -> bytes:
    """How a key is kept and looked up: its SHA-256 digest."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class Scope:
    """A namespace pattern of a key file: one namespace, or (``subtree``) it and all below it."""

    namespace: str
    subtree: bool = False

    @classmethod
    def parse(cls, text: str) -> "Scope":
        """``"acme"``, ``"acme/**"``, ``""`` (top level) or ``"**"`` (everything); raises ValueError."""
        subtree = text == SUBTREE or text.endswith("/" + SUBTREE)
        namespace = text[: -len(SUBTREE)].rstrip("/") if subtree else text
        parts = namespace.split("/") if namespace else []
        if len(parts) > MAX_SEGMENTS - 1:
            raise ValueError(f"{text!r} has more than {MAX_SEGMENTS - 1} namespace levels")
        for part in parts:
            if len(part) > NAME_MAX or not SEGMENT_RE.fullmatch(part) or ".." in part:
                raise ValueError(f"{text!r} is no namespace pattern: write \"acme\", \"acme/**\", \"\" (top-level "
                                 "names) or \"**\" (every namespace)")
        return cls(namespace, subtree)

    def covers(self, namespace: str) -> bool:
        if namespace == self.namespace:
            return True
        return self.subtree and (self.namespace == "" or namespace.startswith(self.namespace + "/"))


@dataclass(frozen=True)
class Grant:
    """What one key may do. ``label`` names it in logs (never the key itself)."""

    label: str
    admin: bool = False
    use: tuple[Scope, ...] = ()
    write: tuple[Scope, ...] = ()

    def may_write(self, name: str) -> bool:
        """Whether the key may upload, replace, load or unload the prompt ``name``."""
        return self.admin or any(s.covers(namespace_of(name)) for s in self.write)

    def may_use(self, name: str) -> bool:
        """Whether the key may see and run the prompt ``name`` (writing implies using)."""
        return self.may_write(name) or any(s.covers(namespace_of(name)) for s in self.use)


ADMIN = Grant("admin", admin=True)
"""The grant of a server without keys, and of ``--api-key``."""


def _fail(path: str | Path, problem: str) -> ConfigError:
    return ConfigError(f"--api-keys {path}: {problem}")


def _read(path: str | Path) -> dict:
    """The file's data: JSON when it ends in .json, else TOML; a syntax error names its line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
        raise _fail(path, f"not valid TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON: {e.msg} (at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise _fail(path, 'the file must hold an object {"keys": [...]}')
    return data


def _patterns(entry: dict, field: str, where: str) -> tuple[Scope, ...]:
    value = entry.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}.{field} must be a list of namespace patterns (strings)")
    try:
        return tuple(Scope.parse(v) for v in value)
    except ValueError as e:
        raise ValueError(f"{where}.{field}: {e}") from None


def _entry(entry, where: str) -> tuple[bytes, Grant]:
    """One ``[[keys]]`` entry -> (digest, grant); raises ValueError naming ``where`` (never the key)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a table (an object)")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    name = entry.get("name", where)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name must be a non-empty string")
    if ("key" in entry) == ("sha256" in entry):
        raise ValueError(f"{where}: give key or sha256 (the key's SHA-256 in hex), exactly one")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}.key is empty")
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(f"{where}.key must be printable characters without spaces")
        key_digest = digest(key)
    else:
        hexed = entry["sha256"]
        if not isinstance(hexed, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexed):
            raise ValueError(f"{where}.sha256 must be 64 hexadecimal digits")
        key_digest = bytes.fromhex(hexed)
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"{where}.admin must be true or false")
    use, write = _patterns(entry, "use", where), _patterns(entry, "write", where)
    if admin and (use or write):
        raise ValueError(f"{where}: an admin key may do everything; drop its use and write")
    return key_digest, Grant(name, admin, use, write)


def parse_keys(data: dict, path: str | Path, reserved: frozenset[bytes] = frozenset()) -> dict[bytes, Grant]:
    """A key file's data -> {digest: grant}; raises ConfigError naming the file and the entry.

    Args:
        reserved: digests of keys given otherwise (``--api-key``): the file may not repeat them.
    """
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise _fail(path, f"unknown field {unknown[0]!r} (the file holds one list: keys)")
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "no keys: add [[keys]] entries (TOML) or {\"keys\": [...]} (JSON)")
    table: dict[bytes, Grant] = {}
    first: dict[bytes, str] = {}
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        try:
            key_digest, grant = _entry(entry, where)
        except ValueError as e:
            raise _fail(path, str(e)) from None
        if key_digest in reserved:
            raise _fail(path, f"{where} is the --api-key (already an admin key)")
        if key_digest in table:
            raise _fail(path, f"{where} has the same key as {first[key_digest]}")
        table[key_digest], first[key_digest] = grant, where
    return table


def load_keys(path: str | Path, reserved: frozenset[bytes] = frozenset()) -> dict[bytes, Grant]:
    """Read and check a key file: {digest: grant}; raises ConfigError (one line, no key in it)."""
    return parse_keys(_read(path), path, reserved)


def _signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyRing:
    """The keys a server accepts: ``--api-key`` (admin) and the ``--api-keys`` file's, re-read
    when the file changes (checked at most every ``poll_s`` seconds, on a request) or on
    :meth:`reload` (SIGHUP). A reload that fails keeps the keys loaded before and logs one line.

    Lookups never lock: a reload swaps the whole table, so a signal handler or another thread may
    reload while requests are looked up.
    """

    def __init__(self, api_key: str | None = None, path: str | Path | None = None, poll_s: float = 2.0):
        self.path = Path(path) if path is not None else None
        self.poll_s = poll_s
        self._admin = {digest(api_key): ADMIN} if api_key else {}
        self._reload_lock = threading.Lock()
        self._checked = time.monotonic()
        self._seen = _signature(self.path) if self.path is not None else None
        self._table = self._admin | (load_keys(self.path, frozenset(self._admin)) if self.path is not None else {})

    def grant(self, key: str) -> Grant | None:
        """The grant of ``key`` (None: no such key)."""
        self._poll()
        return self._table.get(digest(key))

    def reload(self) -> bool:
        """Re-read the key file; True if the new keys are in place."""
        if self.path is None:
            return False
        with self._reload_lock:
            self._seen = _signature(self.path)
            try:
                table = self._admin | load_keys(self.path, frozenset(self._admin))
            except ConfigError as e:
                log.error("%s; keeping the %d key(s) loaded before", e, len(self._table) - len(self._admin))
                return False
            self._table = table
        log.info("--api-keys %s: %d key(s) loaded", self.path, len(table) - len(self._admin))
        return True

    def _poll(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.poll_s:
            return
        self._checked = now
        if _signature(self.path) != self._seen:
            self.reload()

    def reload_on_sighup(self):
        """Re-read the key file on SIGHUP (from the main thread; the reading runs in a thread of
        its own, so that it never waits on a lock the interrupted code holds). Returns the
        previous handler; no-op (None) where there is no SIGHUP."""
        if self.path is None or not hasattr(signal, "SIGHUP"):
            return None
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sighup(*_) -> None:
            threading.Thread(target=self.reload, name="softprompt-keys", daemon=True).start()

        return signal.signal(signal.SIGHUP, on_sighup)


def key_ring(api_key: str | None, path: str | os.PathLike | None) -> KeyRing | None:
    """The ring of a server's keys; None when it has none (every request is then an admin's)."""
    return KeyRing(api_key, path) if api_key or path else None
