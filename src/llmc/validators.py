"""attrs validators and converters for modifier parameters, raising ``ArgumentError``.

A modifier is built from YAML (through the strict cattrs converter) and from Python
(``GPTQModifier(true_sequential="no")``); the second path runs only the attrs validators, so
types are checked here too, not just by the converter. Every message names the parameter, what
is accepted and what was given; the recipe loader adds the path and line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import attrs

from llmc.errors import ArgumentError, closest

__all__ = [
    "OneOf",
    "as_list",
    "choice_message",
    "is_bool",
    "is_number_in",
    "is_one_of",
    "is_positive_int",
    "is_target_list",
]


def _quote(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def choice_message(name: str, options: Collection[Any], value: Any) -> str:
    """``'name' must be in (...) (got value)``, with the closest option when one is close."""
    names = [option for option in options if isinstance(option, str)]
    match = closest(value, names) if isinstance(value, str) else None
    return f"'{name}' must be in {tuple(options)!r} (got {value!r})" + (
        f"; did you mean {match!r}?" if match else ""
    )


@attrs.frozen
class OneOf:
    """Validator: the value is one of ``options``; the CLI makes them the flag's choices.

    Unlike ``attrs.validators.in_`` it raises a one-line ``ArgumentError`` with the closest
    option, also when a class is built directly (``ModelArguments(precision=...)``).
    """

    options: tuple[Any, ...]
    allow_none: bool = False  # None means "not given" (an optional alias), not an option

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and self.allow_none:
            return
        if value not in self.options:
            raise ArgumentError(choice_message(attribute.name, self.options, value), name=attribute.name)


def as_list(value: Any) -> Any:
    """Converter: one string becomes a one-element list (llm-compressor writes ``targets: Linear``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return value  # left for the validator to refuse with the value in the message


def is_bool(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Only ``True``/``False``: ``"no"`` or ``0`` is refused, not read as a truth value."""
    if not isinstance(value, bool):
        raise ArgumentError(
            f"'{attribute.name}' must be true or false (got {_quote(value)})", name=attribute.name
        )


def is_one_of(choices: Iterable[Any]) -> Callable[[Any, attrs.Attribute, Any], None]:
    """One of ``choices`` (a bool never counts as 0 or 1): *'num_bits' must be one of 2, 3, 4, 8
    (got 5)*."""
    choices = tuple(choices)
    listed = ", ".join(_quote(c) for c in choices)

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices or isinstance(value, bool):
            raise ArgumentError(
                f"'{attribute.name}' must be one of {listed} (got {_quote(value)})",
                name=attribute.name,
            )

    return check


def is_positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An int above zero (``True`` is not 1 here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(
            f"'{attribute.name}' must be a positive integer (got {_quote(value)})", name=attribute.name
        )


def is_number_in(
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
    description: str | None = None,
) -> Callable[[Any, attrs.Attribute, Any], None]:
    """A finite number (not a bool) in the given interval; ``description`` replaces the
    generated wording ("a number in [0, 1)") in the message."""
    left = "(" if low_open else "["
    right = ")" if high_open or high is None else "]"
    wording = description or f"a number in {left}{low:g}, {'∞' if high is None else f'{high:g}'}{right}"

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise ArgumentError(
                f"'{attribute.name}' must be {wording} (got {_quote(value)})", name=attribute.name
            )

    return check


def is_target_list(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A list of module names, class names or ``re:`` patterns (each pattern must compile)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ArgumentError(
            f"'{attribute.name}' must be a list of module names, class names or 're:' patterns "
            f"(got {_quote(value)})",
            name=attribute.name,
        )
    for item in value:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as error:
                raise ArgumentError(
                    f"'{attribute.name}' entry {item!r} is not a valid regular expression: {error}",
                    name=attribute.name,
                ) from None
