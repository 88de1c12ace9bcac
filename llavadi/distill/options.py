"""Declared options of distillation terms: type, default, allowed values; validated in one place.

A term class lists its options as ``Option`` objects. ``validate_options`` checks a recipe's
``options`` mapping against them (unknown names, types, ranges, choices) and returns the
options with defaults filled in; every error names the recipe path of the term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavadi.data.token_types import TYPE_GROUPS

LAYER_PAIRS = "layer pairs"  # kind of an option holding [[student_layer, teacher_layer], ...]
GROUP = "token group"  # kind of an option naming a token-type group


@dataclass(frozen=True)
class Option:
    """One option of a term: its name, kind, default and the values it accepts."""

    name: str
    kind: Any  # float, int, bool, str, LAYER_PAIRS or GROUP
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None  # inclusive lower bound, or exclusive with low_open
    high: float | None = None  # inclusive upper bound
    low_open: bool = False

    def describe(self) -> str:
        """One line for docs and errors: name, allowed values, default."""
        if self.kind == GROUP:
            allowed = "|".join(sorted(TYPE_GROUPS))
        elif self.choices:
            allowed = "|".join(str(c) for c in self.choices)
        elif self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low}{' <' if self.low_open else ' <='} "
            hi = "" if self.high is None else f" <= {self.high}"
            allowed = f"{lo}x{hi}"
        else:
            allowed = self.kind if isinstance(self.kind, str) else self.kind.__name__
        return f"{self.name} ({allowed}, default {self.default!r}): {self.help}"

    def validate(self, value: Any, where: str) -> Any:
        """The value, checked and normalised (ints accepted for floats); ValueError naming `where`."""
        bad = f"{where}: option {self.name!r}"
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{bad} must be a number, got {value!r}")
            value = float(value)
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{bad} must be an integer, got {value!r}")
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{bad} must be true or false, got {value!r}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"{bad} must be a string, got {value!r}")
        elif self.kind == GROUP:
            if value not in TYPE_GROUPS:
                raise ValueError(f"{bad} must be a token group, one of {sorted(TYPE_GROUPS)}; got {value!r}")
        elif self.kind == LAYER_PAIRS:
            value = _layer_pairs(value, bad)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{bad} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ValueError(f"{bad} must be {'>' if self.low_open else '>='} {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{bad} must be <= {self.high}, got {value!r}")
        return value


def _layer_pairs(value: Any, bad: str) -> tuple[tuple[int, int], ...]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
            for p in value
        )
    )
    if not ok:
        raise ValueError(f"{bad} must be a non-empty list of [student_layer, teacher_layer] integer pairs, got {value!r}")
    return tuple((int(s), int(t)) for s, t in value)


def validate_options(declared: tuple[Option, ...], given: dict[str, Any], where: str) -> dict[str, Any]:
    """``given`` checked against ``declared``; returns every declared option, defaults filled in."""
    if not isinstance(given, dict):
        raise ValueError(f"{where}: options must be a mapping, got {given!r}")
    by_name = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(by_name))
    problems, options = [], {}
    if unknown:
        valid = "; ".join(o.describe() for o in declared) or "none"
        problems.append(f"{where}: unknown option(s) {unknown}; valid options: {valid}")
    for name, opt in by_name.items():  # every bad value is named, not only the first
        try:
            options[name] = opt.validate(given[name], where) if name in given else opt.default
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return options
