"""The prompts folder as a store: what a prompt name is, where its file lives, and the three file
operations the bank needs (index, read, durable write / removal), each refusing any path that
would leave the folder.

A name is 1-4 segments joined by ``/`` (``acme/ticket-routing``); the file of a name is
``<folder>/<name>.safetensors``, so segments before the last are nested folders, the namespaces.

Not here: parsing or checking a prompt (artifact/), the cache of entries and prefixes (bank.py).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..artifact import MAX_PROMPT_FILE_BYTES, atomic_write_bytes
from ..errors import PromptFileError
from .errors import BadPromptNameError, UnknownPromptError

SEGMENT = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?"
"""One segment: letters, digits, '_', '-' or '.', starting with a letter or digit, never two dots
in a row (so never ``..``)."""
MAX_SEGMENTS = 4
NAME_MAX = 128
"""Longest segment."""
PROMPT_PATTERN = rf"^{SEGMENT}(?:/{SEGMENT}){{0,{MAX_SEGMENTS - 1}}}$"
"""Prompt names: 1-4 segments joined by '/' (namespaces, then the prompt). Written without
look-arounds so that it is a portable JSON-schema ``pattern`` too (the same rule as keys.py's)."""
PROMPT_MAX = MAX_SEGMENTS * (NAME_MAX + 1) - 1
"""Longest prompt name: four segments of ``NAME_MAX`` characters and their '/'."""
PROMPT_RE = re.compile(PROMPT_PATTERN.strip("^$"))

SUFFIX = ".safetensors"
RUN_SUFFIX = ".run"
"""Folders named ``*.run`` are training run folders (``softprompt train --out prompts/x.safetensors``
writes ``prompts/x.run/``), never namespaces."""
READ_TRIES = 3
"""Reads of a file that keeps changing while it is read before giving up on it."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid prompt name, else raise :class:`BadPromptNameError`."""
    if (not isinstance(name, str) or len(name) > PROMPT_MAX or not PROMPT_RE.fullmatch(name) or ".." in name
            or any(len(s) > NAME_MAX for s in name.split("/"))):
        raise BadPromptNameError(
            f"invalid prompt name {name!r}: use 1-{MAX_SEGMENTS} segments joined by '/', each of 1-{NAME_MAX} "
            "letters, digits, '_', '-' or '.' starting with a letter or digit"
        )
    if any(s.endswith(RUN_SUFFIX) for s in name.split("/")[:-1]):
        raise BadPromptNameError(f"invalid prompt name {name!r}: a namespace may not end in {RUN_SUFFIX!r} "
                                 "(training run folders)")
    return name


LIST_MAX = 10_000
"""Most names one page of ``GET /v1/prompts`` may ask for (``limit``)."""


def listing_page(names, namespace: str | None = None, after: str | None = None,
                 limit: int | None = None) -> tuple[list[str], str | None]:
    """One page of a prompt listing (pure): the sorted names under ``namespace`` (at any depth;
    None: all) that sort after ``after``, at most ``limit`` of them (None: all), and the cursor of
    the next page (this page's last name; None when nothing follows). Cursors are names, so a page
    stays right when prompts are added or removed between calls."""
    picked = sorted(n for n in names if (namespace is None or n.startswith(namespace + "/"))
                    and (after is None or n > after))
    if limit is None or len(picked) <= limit:
        return picked, None
    return picked[:limit], picked[limit - 1]


def namespace_of(name: str) -> str:
    """The namespace of a prompt name (pure): every segment but the last, joined by '/'; '' for a
    top-level name. ``namespace_of("acme/support/triage") == "acme/support"``."""
    return name.rpartition("/")[0]


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStamp":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class PromptFolder:
    """The ``--prompts`` folder: names <-> files, never outside it (traversal and symlinks that
    lead out are refused; a symlink inside the folder is followed)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._real = self.root.resolve()

    def path_of(self, name: str) -> Path:
        """``<root>/<name>.safetensors``; the name cannot leave the folder."""
        check_name(name)
        path = self.root.joinpath(*name.split("/")).with_name(name.rpartition("/")[2] + SUFFIX)
        assert path.is_relative_to(self.root)  # segments hold no separator and no ".."
        return path

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self._real)

    def index(self, strict: bool = True) -> list[str]:
        """Every prompt name of the folder, sorted, from directory listings only (no file is
        read). Hidden entries (``.name``: temp files, ``.git``) are skipped; raises
        :class:`PromptFileError` naming the file for a name that is not valid, a file nested
        deeper than the namespaces allow, or a symlink out of the folder (``strict=False``:
        leaves such files out instead)."""
        names = []
        for top, dirs, files in os.walk(self.root):  # symlinked folders are not entered
            rel = Path(top).relative_to(self.root)
            # hidden folders, and the run folders `softprompt train` writes next to its output
            # (<name>.run/: checkpoints, trial prompts) are no namespaces
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(RUN_SUFFIX))
            for f in files:
                if f.startswith(".") or not f.endswith(SUFFIX):
                    continue
                path = Path(top) / f
                name = "/".join((*rel.parts, f[: -len(SUFFIX)]))
                problem = self._problem(path, name)
                if problem is not None and strict:
                    raise PromptFileError(problem)
                if problem is None:
                    names.append(name)
        return sorted(names)

    def _problem(self, path: Path, name: str) -> str | None:
        """Why the file ``path`` cannot be the prompt ``name``, or None."""
        try:
            check_name(name)
        except BadPromptNameError as e:
            return f"{path}: the file's name is not a valid prompt name ({e})"
        if path.is_symlink() and not self._inside(path):
            return f"{path}: a symlink out of the prompts folder"
        return None

    def exists(self, name: str) -> bool:
        """Whether ``name`` has a file in the folder (reached without leaving it through a symlink)."""
        path = self.path_of(name)
        return path.is_file() and self._inside(path)

    def read(self, name: str) -> bytes:
        """The bytes of the prompt file, read once through one open file: a file replaced
        meanwhile (``os.replace``) is read whole, old or new, never mixed. A file rewritten in
        place while it is read (its size or mtime changed) is read again, then refused."""
        path = self.path_of(name)
        if not path.exists():
            raise UnknownPromptError(f"no prompt file {name}{SUFFIX} in the prompts folder")
        if not self._inside(path):
            raise PromptFileError(f"prompt {name!r}: {path} is a symlink out of the prompts folder")
        for _ in range(READ_TRIES):
            with open(path.resolve(), "rb") as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise PromptFileError(f"{path}: not a regular file")
                if before.st_size > MAX_PROMPT_FILE_BYTES:
                    raise PromptFileError(f"{path}: {before.st_size} bytes is too large for a prompt file")
                data = f.read(MAX_PROMPT_FILE_BYTES + 1)
                after = os.fstat(f.fileno())
            if FileStamp.of(before) == FileStamp.of(after) and len(data) == after.st_size:
                return data
        raise PromptFileError(f"{path}: the file kept changing while it was read; write prompt files atomically")

    def write(self, name: str, data: bytes) -> Path:
        """Write the prompt file durably: temp file in the same folder, fsync, rename over the old
        file (artifact's ``atomic_write_bytes``), then fsync of the folders whose entries changed,
        so that the rename survives a power cut. Namespace folders are made as needed."""
        path = self.path_of(name)
        made = [p for p in path.parents if p.is_relative_to(self.root) and p != self.root and not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._inside(path.parent):
            raise PromptFileError(f"prompt {name!r}: its folder leads out of the prompts folder")
        atomic_write_bytes(path, data)
        for folder in {path.parent, *(p.parent for p in made)}:
            _fsync_dir(folder)
        return path

    def remove(self, name: str) -> bool:
        """Delete the prompt file (and fsync its folder); False when there was none."""
        path = self.path_of(name)
        if not self._inside(path.parent):
            raise PromptFileError(f"prompt {name!r}: its folder leads out of the prompts folder")
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
