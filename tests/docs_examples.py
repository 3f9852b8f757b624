"""The docs' examples as the tests run them: a page found by its title, its code blocks, its
commands. One helper for every test that runs what the docs (README, docs/) say."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def page(title: str) -> str:
    """The text of the docs page whose first line is ``# title`` ("README" for README.md)."""
    if title == "README":
        return (ROOT / "README.md").read_text()
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text()
        if text.startswith(f"# {title}\n"):
            return text
    raise KeyError(f"no docs page titled {title!r}")


def section(text: str, heading: str) -> str:
    """The part of ``text`` under ``## heading`` up to the next ``## `` heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of ``lang`` in ``text``."""
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(text: str, start: str = "softprompt ") -> list[str]:
    """The ``bash`` lines of ``text`` that start with ``start``, trailing ``  # comments`` cut."""
    return [l.split("  #")[0].strip() for b in blocks(text, "bash") for l in b.splitlines() if l.startswith(start)]
