"""YAML files checked field by field, with the line of every field for error messages.

``load(path, schema)`` parses with PyYAML's safe loader (no Python objects), then checks each field
against a small schema; an error names the file, the field and its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from edgerun.errors import UsageError


class YamlError(UsageError):
    """A malformed YAML file or a field with a bad value."""


@dataclass(frozen=True)
class Field:
    """One field: ``check(value)`` returns an error text or None; ``required`` fields must be present."""

    check: Callable[[Any], str | None]
    required: bool = True
    default: Any = None


_MAX_NODES = 100_000  # nodes visited through aliases: a "billion laughs" file is refused, not expanded


def _lines(node, prefix="", seen=None, budget=None) -> dict[str, int]:
    """Map of dotted field path -> 1-based line, from a composed YAML node.

    Raises:
        ValueError: a recursive alias (a node inside itself) or more than ``_MAX_NODES`` nodes once
            aliases are expanded.
    """
    seen = () if seen is None else seen
    budget = budget if budget is not None else [_MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"more than {_MAX_NODES} values once aliases are expanded")
    if id(node) in seen:
        raise ValueError("a recursive alias (a value that contains itself)")
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        inner = seen + (id(node),)
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            out.update(_lines(v, key + ".", inner, budget))
    elif isinstance(node, yaml.SequenceNode):
        inner = seen + (id(node),)
        for i, v in enumerate(node.value):
            key = f"{prefix.rstrip('.')}[{i}]"
            out[key] = v.start_mark.line + 1
            out.update(_lines(v, key + ".", inner, budget))
    return out


def read(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Parse ``path`` (a YAML mapping); return the data and the line of every field.

    Raises:
        YamlError: missing file, YAML syntax error (with its line), or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise YamlError(f"cannot read {path}: {e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise YamlError(f"{path}: malformed YAML: values nested too deeply") from None
    if not isinstance(data, dict):
        raise YamlError(f"{path}: expected a mapping of fields at the top level")
    try:
        return data, _lines(node)
    except ValueError as e:
        raise YamlError(f"{path}: malformed YAML: {e}") from None


def check(path: Path, data: dict, lines: dict[str, int], schema: dict[str, Field], prefix: str = "") -> dict:
    """Validate ``data`` against ``schema``; return it with defaults filled in.

    Raises:
        YamlError: a missing required field, an unknown field, or a bad value (file, field, line named).
    """
    out = dict(data)
    for name, spec in schema.items():
        key = prefix + name
        if name not in data or data[name] is None:
            if spec.required:
                raise YamlError(f"{path}: missing field '{key}'")
            out[name] = spec.default
            continue
        problem = spec.check(data[name])
        if problem:
            raise YamlError(f"{path}, line {lines.get(key, '?')}: field '{key}' {problem}")
    unknown = sorted(set(data) - set(schema), key=str)   # keys may mix types (1: and a:)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise YamlError(f"{path}, line {lines.get(key, '?')}: unknown field '{key}'; known: {', '.join(schema)}")
    return out


# --- value checks --------------------------------------------------------------------------------

def is_str(v) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def positive_int(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else f"must be a positive integer, got {v!r}"


def positive_number(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return None if ok else f"must be a positive number, got {v!r}"


def non_negative_number(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    return None if ok else f"must be a number >= 0, got {v!r}"


def list_of(item_check) -> Callable[[Any], str | None]:
    def f(v):
        if not isinstance(v, list):
            return f"must be a list, got {v!r}"
        for i, x in enumerate(v):
            p = item_check(x)
            if p:
                return f"item {i} {p}"
        return None
    return f


def one_of(choices) -> Callable[[Any], str | None]:
    def f(v):
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}, got {v!r}"
    return f
