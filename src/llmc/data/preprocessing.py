"""Find the user's row-shaping function from ``preprocessing_func``.

Python callers pass the function itself; the CLI and config files can only name it, as
``'module:function'``. Resolving the name before any row is read makes a typo fail at once, with
the names the module does have.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from llmc.errors import ArgumentError, did_you_mean

__all__ = ["resolve_preprocessing_func"]


def resolve_preprocessing_func(func: Any) -> Callable[[dict[str, Any]], Any] | None:
    """A callable from ``preprocessing_func``; CLI users and config files can only give a string."""
    if func is None or callable(func):
        return func
    if not isinstance(func, str):
        raise ArgumentError(
            "preprocessing_func must be a callable or a 'module:function' string "
            f"(got {type(func).__name__})",
            name="preprocessing_func",
        )
    module_name, sep, attr = func.partition(":")
    if not sep or not module_name or not attr:
        raise ArgumentError(
            f"preprocessing_func {func!r} must have the form 'module:function', "
            "e.g. 'my_project.data:to_text'",
            name="preprocessing_func",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ArgumentError(
            f"cannot import module {module_name!r} named by preprocessing_func {func!r}: {error}",
            name="preprocessing_func",
        ) from error
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            choices = [n for n in dir(target) if not n.startswith("_")]
            raise ArgumentError(
                f"module {module_name!r} has no attribute {attr!r} "
                f"(preprocessing_func){did_you_mean(part, choices)}",
                name="preprocessing_func",
            )
        target = getattr(target, part)
    if not callable(target):
        raise ArgumentError(
            f"preprocessing_func {func!r} is a {type(target).__name__}, not a function",
            name="preprocessing_func",
        )
    return target
