"""Declared parameters of converter passes and merge methods: name, type, default, help, validation.

A pass (:mod:`converters.passes`) or a merge method (:mod:`converters.merge`) lists its parameters
as :class:`Param` values, mergekit style (each merge method declares its parameters and their
defaults, ``mergekit/merge_methods/``). The same declaration validates both entry points:

- keyword values from the CLI or the Python API, through :func:`validate` (a :class:`UsageError`
  naming the flag and the parameter);
- YAML recipes, through the project's field checker :mod:`edgerun.formats.yamlfile`
  (:meth:`Param.field` turns a declaration into a ``yamlfile.Field``; errors name file, field, line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from edgerun.errors import UsageError
from edgerun.formats import yamlfile


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()   # the default of a parameter that must be given

_TYPE_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
              list: "a list", dict: "a mapping"}


def type_problem(kind: type, value: Any) -> str | None:
    """Why ``value`` is not of ``kind`` (bool, int, float, str, list, dict), or None.

    Integers count as floats; booleans count only as booleans; floats must be finite.
    """
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is str:
        ok = isinstance(value, str) and bool(value.strip())
    else:
        ok = isinstance(value, kind)
    return None if ok else f"must be {_TYPE_TEXT.get(kind, kind.__name__)}, got {value!r}"


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    Attributes:
        name: its name in recipes and keyword arguments (snake_case).
        type: ``bool``, ``int``, ``float``, ``str``, ``list`` or ``dict``.
        default: the value when not given; :data:`REQUIRED` if it must be given; None: optional.
        help: one line: what it does, with its unit.
        check: further validation after the type check: ``check(value)`` returns the problem
            ("must be in (0, 1], got 0") or None.
        choices: the allowed values (empty: any).
        item: for ``list``: the type of each item (None: any).
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    check: Callable[[Any], str | None] | None = None
    choices: tuple = ()
    item: type | None = None

    @property
    def required(self) -> bool:
        """True when the parameter has no default and must be given."""
        return self.default is REQUIRED

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this parameter (type, choices, then ``check``), or None."""
        bad = type_problem(self.type, value)
        if bad:
            return bad
        if self.item is not None:
            for i, x in enumerate(value):
                bad = type_problem(self.item, x)
                if bad:
                    return f"item {i} {bad}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        return self.check(value) if self.check else None

    def field(self) -> yamlfile.Field:
        """This parameter as a field of :func:`edgerun.formats.yamlfile.check`."""
        return yamlfile.Field(self.problem, required=self.required, default=None if self.required else self.default)

    def describe(self) -> str:
        """``name (type, default X): help`` for listings."""
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} ({self.type.__name__}, {default}): {self.help}"


def schema(params: tuple[Param, ...] | list[Param]) -> dict[str, yamlfile.Field]:
    """The yamlfile schema of a parameter list."""
    return {p.name: p.field() for p in params}


def validate(params: tuple[Param, ...] | list[Param], values: dict, where: str) -> dict:
    """Check keyword ``values`` against ``params``; return every parameter's value (defaults filled in).

    ``None`` means "not given" (the default applies).

    Raises:
        UsageError: ``"<where>: unknown parameter 'x'; known: ..."``, ``"<where>: missing parameter 'x'"``
            or ``"<where>: <name> <problem>"``.
    """
    known = {p.name: p for p in params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown parameter '{unknown[0]}'; known: {', '.join(known)}")
    out = {}
    for p in params:
        v = values.get(p.name)
        if v is None:
            if p.required:
                raise UsageError(f"{where}: missing parameter '{p.name}' ({p.help})")
            out[p.name] = p.default
            continue
        bad = p.problem(v)
        if bad:
            raise UsageError(f"{where}: {p.name} {bad}")
        out[p.name] = v
    return out


# --- value checks (after the type check) ----------------------------------------------------------

def positive(v) -> str | None:
    """> 0."""
    return None if v > 0 else f"must be positive, got {v!r}"


def at_least(lo: float) -> Callable[[Any], str | None]:
    """>= lo."""
    return lambda v: None if v >= lo else f"must be >= {lo:g}, got {v!r}"


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
             note: str = "") -> Callable[[Any], str | None]:
    """In the interval (or half-open interval) from lo to hi; ``note`` explains the bound."""
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return None if ok else f"must be in {span}{f' ({note})' if note else ''}, got {v!r}"
    return check
