"""Command-line flags generated from a config dataclass: a field with its attribute docstring is
one flag, and the config is built back from the parsed arguments by field name.

The flag's name comes from the field's (``max_steps`` -> ``--max-steps``), its parser and choices
from the annotation (``int``, ``float``, ``bool`` -> a switch, ``Literal[...]`` -> choices,
``list[str]`` -> repeatable), its default from the field's, its help from the docstring right
below the field. What differs is stated on the field with :func:`flag` (other names, a registry
as choices, a converter, the help group it opens). A field whose type is a dataclass adds that
class's flags and is built from them.

Not here: how ``--help`` looks (cli_help.py), what a setting means and its checks (the configs).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import re
import textwrap
import types
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, Callable, Collection, Iterator, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

_KEY = "softprompt.flag"
FIELD_DEFAULT: Any = type("FieldDefault", (), {"__repr__": lambda self: "FIELD_DEFAULT"})()
"""``Flag.default`` when the flag's default is the field's."""
NONE_WORDS = ("none", "off")
"""What turns off an optional number whose default is on (``--patience none``)."""


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line, where the field alone does not say."""

    names: tuple[str, ...] = ()
    """Flag names (default: ``--field-name``). Several: each is its own flag, at most one may be given."""
    group: str | None = None
    """Help group this field opens; the fields after it join it until the next ``group``."""
    choices: Collection[str] | None = None
    """The allowed values, e.g. a registry (its keys); default: the ``Literal``'s values, if any."""
    default: Any = FIELD_DEFAULT
    """The flag's default where it differs from the field's (e.g. ``"auto"`` for a None device)."""
    convert: Callable[[Any, argparse.Namespace], Any] | None = None
    """Flag value (and the other arguments) -> field value, e.g. a comma-separated list -> list."""
    parse: Callable[[str], Any] | None = None
    """The argparse ``type`` where the annotation's is not the one wanted."""
    metavar: str | None = None
    """The value's name in ``--help`` (default: the field's, upper-case)."""
    positional: bool = False
    """An argument without a flag name (``softprompt eval PROMPT``)."""
    help: str | None = None
    """Help where the class has no source to read the docstring from (``make_dataclass``)."""
    cli: bool = True
    """False: a Python-API-only field, no flag."""


def flag(*names: str, **kw: Any) -> dict[str, Flag]:
    """Field metadata: ``field(default=None, metadata=flag("--field", metavar="NAME"))``."""
    return {_KEY: Flag(names=names, **kw)}


def spec_of(f: Field) -> Flag:
    return f.metadata.get(_KEY) or Flag()


def flag_names(f: Field) -> tuple[str, ...]:
    """The field's flag names: its own or ``--field-name``."""
    return spec_of(f).names or ("--" + f.name.replace("_", "-"),)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring below it, over ``cls`` and its bases (a subclass's own wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # built-ins, object, make_dataclass
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def help_text(doc: str) -> str:
    """A field docstring as ``--help`` text (pure): one line, reST marks and a leading "``--flag``:" off,
    a lower-case start, no final full stop, % escaped for argparse."""
    text = " ".join(doc.split())
    text = re.sub(r"^``--[\w-]+``:\s*", "", text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    first = re.match(r"[A-Za-z]+", text)
    # "Training data" -> "training data", "A count" -> "a count"; "AdamW" and "JSON" stay
    if first and (len(first.group()) == 1 or first.group()[1:].islower()):
        text = text[0].lower() + text[1:]
    return text.rstrip(".").replace("%", "%%")


def _members(tp: Any) -> list[Any]:
    return list(get_args(tp)) if get_origin(tp) in (Union, types.UnionType) else [tp]


def _number(kind: type, words: tuple[str, ...], none_ok: bool) -> Callable[[str], Any]:
    """A parser of ``kind`` that also takes ``words`` (as themselves) and, if ``none_ok``, none/off (None)."""

    def parse(value: str):
        low = value.lower()
        if low in words:
            return low
        if none_ok and low in NONE_WORDS:
            return None
        return kind(value)

    parse.__name__ = " or ".join([kind.__name__, *words, *(("none",) if none_ok else ())])
    return parse


def choices_of(f: Field, hint: Any) -> list[str] | None:
    """The values field ``f`` allows: its ``flag(choices=...)``, else its ``Literal``'s (None: any of its type)."""
    spec = spec_of(f)
    if spec.choices is not None:
        return list(spec.choices)
    members = _members(hint)
    if any(m is not type(None) and get_origin(m) is not Literal for m in members):
        return None  # a number or text besides the words (--max-steps 10 | auto)
    return [v for m in members if get_origin(m) is Literal for v in get_args(m)] or None


def check_choices(config: Any) -> None:
    """Refuse a field holding a value outside its choices (None passes where the type allows it),
    in one line naming the flag: ``--schedule 'step': choose one of cosine, linear, constant``."""
    for f, hint in flag_fields(type(config)):
        choices, value = choices_of(f, hint), getattr(config, f.name)
        if choices is None or (value is None and type(None) in _members(hint)) or value in choices:
            continue
        raise ConfigError(f"{flag_names(f)[0]} {value!r}: choose one of {', '.join(map(str, choices))}")


def argument(f: Field, hint: Any, doc: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``add_argument``'s names and keywords for field ``f`` of type ``hint`` (pure)."""
    spec = spec_of(f)
    default = spec.default
    if default is FIELD_DEFAULT:
        default = f.default_factory() if f.default_factory is not MISSING else f.default
    kw: dict[str, Any] = {"help": spec.help if spec.help is not None else help_text(doc)}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    members = _members(hint)
    kinds = [m for m in members if m is not type(None) and get_origin(m) is not Literal]
    words = tuple(v for m in members if get_origin(m) is Literal for v in get_args(m))
    if hint is bool:
        return flag_names(f), {**kw, "action": "store_true"}
    if get_origin(hint) is list and isinstance(default, list):
        return flag_names(f), {**kw, "action": "append", "default": list(default)}
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
    if spec.positional:
        kw.pop("required", None)
        return (f.name,), kw
    choices = choices_of(f, hint)
    if choices is not None:
        kw["choices"] = choices
    if spec.parse is not None:
        kw["type"] = spec.parse
    elif len(kinds) == 1 and kinds[0] in (int, float):  # numbers; an optional one that is on by default takes none
        none_ok = type(None) in members and default is not None
        kw["type"] = _number(kinds[0], words, none_ok) if words or none_ok else kinds[0]
    return flag_names(f), kw


def flag_fields(cls: type) -> Iterator[tuple[Field, Any]]:
    """The fields of ``cls`` that are flags, each with its resolved type."""
    hints = _hints(cls)
    for f in fields(cls):
        if f.init and spec_of(f).cli:
            yield f, hints[f.name]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, leave_out: Collection[str] = (),
                     before: dict[str, Callable[[argparse.ArgumentParser], None]] | None = None,
                     groups: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add a flag per field of ``cls`` (nested config dataclasses included) to ``parser``, in field
    order, in the help groups the fields open. Flags named in ``leave_out`` are not added and parse
    as their defaults. ``before[title](parser)`` runs just before group ``title`` is made (a
    command's own group in between). Returns title -> group, for a command's own flags."""
    groups = {} if groups is None else groups
    target: Any = parser
    docs = field_docs(cls)
    for f, hint in flag_fields(cls):
        spec = spec_of(f)
        if spec.group is not None:
            if spec.group not in groups:
                if before and spec.group in before:
                    before[spec.group](parser)
                groups[spec.group] = parser.add_argument_group(spec.group)
            target = groups[spec.group]
        if is_dataclass(hint):
            add_config_flags(target, hint, leave_out=leave_out, before=before, groups=groups)
            continue
        names, kw = argument(f, hint, docs.get(f.name, ""))
        for name in names:
            if name in leave_out:
                off = False if kw.get("action") == "store_true" else None
                parser.set_defaults(**{_dest(name): kw.get("default", off)})
            else:
                target.add_argument(name, **kw)
    return groups


def config_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` the parsed flags give, by field name: aliases merged (at
    most one given), converters applied, nested configs built."""
    kw: dict[str, Any] = {}
    for f, hint in flag_fields(cls):
        if is_dataclass(hint):
            kw[f.name] = hint(**config_kwargs(hint, args))
            continue
        spec = spec_of(f)
        names = (f.name,) if spec.positional else flag_names(f)
        values = [(n, getattr(args, _dest(n))) for n in names if hasattr(args, _dest(n))]
        if not values:
            continue  # not on this parser: the field's default
        given = [(n, v) for n, v in values if v is not None and v is not False]  # 0 and "" are given
        if len(given) > 1:
            raise ConfigError(f"give {' or '.join(n for n, _ in given)}, not both")
        value = (given or values)[0][1]
        kw[f.name] = spec.convert(value, args) if spec.convert is not None else value
    return kw


def config_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` built from the parsed flags (validated by its ``__post_init__``); ``given`` adds or overrides."""
    return cls(**{**config_kwargs(cls, args), **given})
