"""Declarative hyperparameter checks.

Each optimizer lists the rules its arguments obey; :func:`check` turns a broken rule
into a ``ValueError`` whose message starts with torch's wording (so torch's own error
tests match it) and names our argument and the value it was given.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import mlx.core as mx


@dataclass(frozen=True)
class Rule:
    """``arg`` (or its element ``index`` when it is a tuple) must satisfy ``ok``.

    ``message`` is formatted with ``value``, ``index`` and ``whole`` (the argument as
    given); ``requirement`` is appended in parentheses, naming the argument.
    """

    arg: str
    ok: Callable[[float], bool]
    message: str
    requirement: str
    index: int | None = None


def at_least(arg: str, bound: float, message: str, index: int | None = None) -> Rule:
    return Rule(arg, lambda v: v >= bound, message, f"{_name(arg, index)} must be >= {bound}", index)


def at_most(arg: str, bound: float, message: str, index: int | None = None) -> Rule:
    return Rule(arg, lambda v: v <= bound, message, f"{_name(arg, index)} must be <= {bound}", index)


def greater_than(arg: str, bound: float, message: str, index: int | None = None) -> Rule:
    return Rule(arg, lambda v: v > bound, message, f"{_name(arg, index)} must be > {bound}", index)


def in_range(arg: str, low: float, high: float, message: str, *, high_open: bool = False,
             index: int | None = None) -> Rule:
    close = ")" if high_open else "]"
    return Rule(
        arg,
        (lambda v: low <= v < high) if high_open else (lambda v: low <= v <= high),
        message,
        f"{_name(arg, index)} must lie in [{low}, {high}{close}",
        index,
    )


def _name(arg: str, index: int | None) -> str:
    return arg if index is None else f"{arg}[{index}]"


# The rules most optimizers share, in torch's words.
LEARNING_RATE = at_least("learning_rate", 0.0, "Invalid learning rate: {value}")
EPS = at_least("eps", 0.0, "Invalid epsilon value: {value}")
WEIGHT_DECAY = at_least("weight_decay", 0.0, "Invalid weight_decay value: {value}")
MOMENTUM = at_least("momentum", 0.0, "Invalid momentum value: {value}")
BETAS = tuple(
    in_range("betas", 0.0, 1.0, "Invalid beta parameter at index {index}: {value}",
             high_open=True, index=i)
    for i in (0, 1)
)


def scalar_value(arg: str, value: Any) -> float | None:
    """The float a hyperparameter starts at (a schedule's value at step 0)."""
    if callable(value):
        value = value(mx.array(0))
    if isinstance(value, mx.array):
        if value.size != 1:
            raise ValueError(f"{arg} must be a scalar (1-element) value, got shape {value.shape}")
        if not mx.issubdtype(value.dtype, mx.number) or mx.issubdtype(value.dtype, mx.complexfloating):
            raise TypeError(f"{arg} must be a real number, got an mx.array of {value.dtype}")
        return value.item()
    # numbers.Real: Python and numpy numbers alike (np.float32(1e-3) as torch takes it).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a number, an mx.array scalar or a schedule, got {value!r}")
    return float(value)


def check(rules: Iterable[Rule], values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first rule that ``values`` breaks.

    An argument with rules on its elements is a tuple of exactly that many values.
    """
    rules = tuple(rules)
    lengths: dict[str, int] = {}
    for rule in rules:
        if rule.index is not None:
            lengths[rule.arg] = max(lengths.get(rule.arg, 0), rule.index + 1)
    for arg, length in lengths.items():
        raw = values.get(arg)
        if isinstance(raw, (tuple, list)) and len(raw) != length:
            raise ValueError(f"{arg} must hold {length} values, got {len(raw)}: {tuple(raw)!r}")
    for rule in rules:
        if rule.arg not in values:
            continue
        raw = values[rule.arg]
        if rule.index is not None:
            if not isinstance(raw, (tuple, list)) or len(raw) <= rule.index:
                raise TypeError(f"{rule.arg} must be a tuple, got {raw!r}")
            raw = raw[rule.index]
        if raw is None:  # an optional value left at its default (Adafactor's eps[0])
            continue
        shown = raw if isinstance(raw, (int, float)) else scalar_value(rule.arg, raw)
        value = scalar_value(_name(rule.arg, rule.index), raw)
        if math.isnan(value) or not rule.ok(value):
            text = rule.message.format(value=shown, index=rule.index, whole=values[rule.arg])
            raise ValueError(f"{text} ({rule.requirement})")
