"""Pipeline strings: ``fold,noop,dce``, ``prune(sparsity=0.5)``, groups; parsed to passes and printed
back canonically."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Union

from ..errors import InputError
from ..options import (
    build_options,
    describe,
    format_value,
    option_help,
    option_types,
    parse_value,
    split_kv,
    split_top,
)
from .registry import _PRESETS, _REGISTRY, Pass, _load_passes, get_pass


@dataclass
class Group:
    """Passes run in order, repeated until none changes the graph when ``fixed_point``."""

    name: str
    steps: list[Pass]
    fixed_point: bool = True
    max_rounds: int = 10

    def canonical(self) -> str:
        return self.name


Step = Union[Pass, Group]


class Pipeline:
    """An ordered list of passes and preset groups."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)

    @classmethod
    def parse(cls, spec: Union[str, "Pipeline", Iterable[Any], None]) -> "Pipeline":
        """From 'dce,prune(sparsity=0.5)', a recipe-style list, Pass objects, or a Pipeline."""
        if isinstance(spec, Pipeline):
            return spec
        if spec is None:
            return cls([])
        if isinstance(spec, str):
            return cls(_make_step(*_parse_item(item)) for item in split_top(spec) if item.strip())
        steps: list[Step] = []
        for item in spec:
            if isinstance(item, (Pass, Group)):
                steps.append(item)
            elif isinstance(item, str):
                steps.extend(cls.parse(item).steps)
            elif isinstance(item, dict) and len(item) == 1:
                (name, values), = item.items()
                steps.append(_make_step(str(name), dict(values or {})))
            else:
                raise InputError(f"cannot read pipeline entry {item!r}: use a name, 'name(opt=value)' or {{name: {{opt: value}}}}")
        return cls(steps)

    def canonical(self) -> str:
        return ",".join(step.canonical() for step in self.steps)

    def passes(self) -> list[Pass]:
        """Every pass, groups expanded."""
        return [p for s in self.steps for p in (s.steps if isinstance(s, Group) else [s])]

    def __str__(self) -> str:
        return self.canonical()


def _make_step(name: str, values: dict[str, Any]) -> Step:
    _load_passes()  # registers the presets
    if name in _PRESETS and name not in _REGISTRY:
        if values:
            raise InputError(f"preset '{name}' takes no options")
        text, fixed = _PRESETS[name]
        return Group(name, Pipeline.parse(text).passes(), fixed_point=fixed)
    cls = get_pass(name)
    prerequisites = True
    if "prerequisites" in values and "prerequisites" not in option_types(cls.Options):
        try:
            prerequisites = parse_value(bool, values.pop("prerequisites"))
        except ValueError as exc:
            raise InputError(f"pass '{name}' option 'prerequisites': {exc}") from None
    return cls(build_options(name, cls.Options, values), prerequisites=prerequisites)




def _parse_item(item: str) -> tuple[str, dict[str, str]]:
    item = item.strip()
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?", item, re.S)
    if not match:
        raise InputError(f"cannot read pipeline item '{item}': expected name or name(option=value,...)")
    name, body = match.group(1), match.group(2)
    values = dict(split_kv(kv, f"pass '{name}'") for kv in split_top(body or "") if kv.strip())
    return name, values


def describe_pass(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, description) rows for ``onnxopt passes``; the description is the
    option's ``help`` (declared with ``onnxopt.options.option``), '' when it has none."""
    defaults = cls.Options()
    helps = option_help(cls.Options)
    return [(name, describe(kind), format_value(getattr(defaults, name)), helps.get(name, ""))
            for name, kind in option_types(cls.Options).items()]


# ----------------------------------------------------------------- contracts
