"""Typed pass options: dataclass fields parsed from strings and printed back canonically.

One grammar serves the pipeline string, recipes and the CLI:
``bool`` is true/false, lists are ``;``-separated, unions try each member in
order (``float | Literal["auto"]`` accepts ``0.5`` and ``auto``), ``Optional``
accepts ``none``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import InputError


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """Declare a pass option: its default (``factory`` makes a mutable one, as dataclasses'
    default_factory) and a one-line description, which ``onnxopt passes`` prints. Every shipped
    pass declares its options this way::

        @dataclass
        class MyOptions:
            limit: int = option(64, help="largest tensor touched, in elements")
            names: list[str] = option(factory=list, help="node names (globs) left alone")
    """
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def option_help(options_cls: type) -> dict[str, str]:
    """Field name -> its one-line description ('' when it has none)."""
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(options_cls)}


def option_types(options_cls: type) -> dict[str, Any]:
    """Field name -> annotated type for an options dataclass."""
    return typing.get_type_hints(options_cls)


def parse_value(kind: Any, value: Any) -> Any:
    """Convert ``value`` (a string, or a YAML scalar/list) to ``kind``; ValueError when it does not fit."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        members = get_args(kind)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in members:
                return None
        for member in members:
            if member is type(None):
                continue
            try:
                return parse_value(member, value)
            except ValueError:
                continue
        raise ValueError(f"expected {describe(kind)}, got {value!r}")
    if origin is Literal:
        choices = get_args(kind)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text in choices:
            return text
        raise ValueError(f"expected one of {'|'.join(map(str, choices))}, got {value!r}")
    if origin in (list, tuple):
        (item,) = get_args(kind)[:1]
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(";") if v.strip()]
        return [parse_value(item, v.strip() if isinstance(v, str) else v) for v in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind is str:
        return str(value)
    raise ValueError(f"unsupported option type {kind!r}")


def describe(kind: Any) -> str:
    """Human-readable type: 'float | auto', 'list of str', 'true|false'."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(m) for m in get_args(kind) if m is not type(None)) + (
            " | none" if type(None) in get_args(kind) else "")
    if origin is Literal:
        return "|".join(map(str, get_args(kind)))
    if origin in (list, tuple):
        return f"{describe(get_args(kind)[0])};..."
    if kind is bool:
        return "true|false"
    return getattr(kind, "__name__", str(kind))


def format_value(value: Any) -> str:
    """Canonical text for an option value; ``parse_value`` reads it back to the same value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ";".join(format_value(v) for v in value)
    return str(value)


def build_options(pass_name: str, options_cls: type, values: dict[str, Any]) -> Any:
    """Instantiate an options dataclass from raw values, with errors that name the pass and option."""
    kinds = option_types(options_cls)
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in kinds:
            known = ", ".join(f"{k} ({describe(t)})" for k, t in kinds.items()) or "none"
            raise InputError(f"pass '{pass_name}' has no option '{key}'; its options: {known}")
        try:
            parsed[key] = parse_value(kinds[key], raw)
        except ValueError as exc:
            raise InputError(f"pass '{pass_name}' option '{key}': {exc}") from None
    try:
        options = options_cls(**parsed)
    except (TypeError, ValueError) as exc:
        raise InputError(f"pass '{pass_name}': {exc}") from None
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise InputError(f"pass '{pass_name}': {exc}") from None
    return options


def option_items(options: Any) -> list[tuple[str, Any]]:
    """(name, value) pairs in declaration order."""
    return [(f.name, getattr(options, f.name)) for f in dataclasses.fields(options)]


def split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InputError(f"unbalanced ')' in pipeline '{text}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise InputError(f"unbalanced '(' in pipeline '{text}'")
    parts.append("".join(cur))
    return parts


def split_kv(item: str, where: str) -> tuple[str, str]:
    if "=" not in item:
        raise InputError(f"{where}: expected key=value, got '{item.strip()}'")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()
