"""The cattrs converter that turns user input (kwargs, YAML, CLI) into attrs classes.

Strict on purpose: ``True`` is not an int, ``[1, 2]`` is not a bool and ``3.7`` is not a
sample count; a user's slip must surface as an error naming the field, not as a silent
conversion. One string where a list of strings is expected is taken as a one-element list, the
way llm-compressor recipes write ``targets: Linear``.

Messages are one line: attrs validators raise ``ValueError(message, attribute, ...)``, whose
``str()`` is the whole tuple, so ``error_text`` keeps the message (and, for ``attrs.validators.in_``,
rewrites it with the closest valid value).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import attrs
import cattrs

from llmc.validators import choice_message

__all__ = ["error_text", "make_converter", "validation_problems"]


def error_text(error: BaseException) -> str:
    """The one-line message of ``error``, also when an attrs validator raised it."""
    args = error.args
    if len(args) > 1 and isinstance(args[0], str) and isinstance(args[1], attrs.Attribute):
        # attrs.validators.in_ raises ValueError(message, attribute, options, value).
        if isinstance(error, ValueError) and len(args) == 4 and isinstance(args[2], Collection):
            return choice_message(args[1].name, args[2], args[3])
        return args[0]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _strict_bool(value: Any, _: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"expected true or false, got {value!r}")


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an integer, got {value!r}")


def _str_list(value: Any, _: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise TypeError(f"expected a string or a list of strings, got {value!r}")


def make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook_func(lambda t: t == list[str], _str_list)
    return converter


def _format_leaf(error: BaseException, expected_type: Any) -> str:
    # No type means the error came from the class's own validators, whose text says it all.
    if expected_type is None or isinstance(error, TypeError) and str(error).startswith("expected"):
        return error_text(error)
    message = cattrs.v.format_exception(error, expected_type)
    return message.replace("invalid value for type, expected", "expected")


def validation_problems(error: BaseException, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for every problem cattrs found, with the value that was given."""
    problems = []
    for message in cattrs.transform_error(error, path="$", format_exception=_format_leaf):
        text, _, where = message.rpartition(" @ ")
        field = where.removeprefix("$").lstrip(".").split(".")[0].split("[")[0]
        if field and field in values and "got" not in text:
            text = f"{text} (got {values[field]!r})"
        problems.append((field, text))
    return problems
