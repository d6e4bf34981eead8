"""Errors that llmc raises on purpose.

Every error a user can cause (a bad argument, recipe, dataset, model path or output directory)
is an ``LlmcError`` whose message is one line saying what failed, where, and what would be
accepted. The CLI prints that line instead of a traceback; Python callers can catch the base class
or one of the precise subclasses and read their structured attributes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ArgumentError",
    "CalibrationError",
    "DataError",
    "DistributedError",
    "LlmcError",
    "ModelLoadError",
    "PluginError",
    "RecipeError",
    "SaveError",
    "closest",
    "did_you_mean",
    "names_with_closest",
    "root_cause_line",
]


class LlmcError(Exception):
    """Base class of the errors llmc raises for bad input or a failed step."""


class ArgumentError(LlmcError, ValueError):
    """An entrypoint argument is unknown or has the wrong type or value."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class RecipeError(LlmcError, ValueError):
    """A recipe cannot be parsed or validated; ``problems`` lists every problem found."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class PluginError(LlmcError):
    """A plugin is missing, broken, or two plugins claim the same name."""

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class DataError(LlmcError, ValueError):
    """Calibration or evaluation data cannot be loaded or is unusable."""


class DistributedError(LlmcError):
    """A collective operation with the other ranks of a torchrun job failed (a rank died or
    timed out), or the process group could not be joined."""


class ModelLoadError(LlmcError):
    """A model or tokenizer cannot be loaded from the given path or hub name."""


class CalibrationError(LlmcError):
    """The layer-by-layer calibration could not run or a modifier could not compress a layer."""

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class SaveError(LlmcError):
    """The compressed checkpoint cannot be written where it was asked to go."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The most similar valid name, so a typo gets a useful hint."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A '; did you mean X?' suffix, or a list of what is valid when nothing is close."""
    choices = sorted(set(choices))
    match = closest(name, choices)
    if match is not None:
        return f"; did you mean {match!r}?"
    if len(choices) <= 12:
        return f"; valid names: {', '.join(choices)}" if choices else ""
    return ""


def root_cause_line(error: BaseException) -> str:
    """One line about ``error``'s root cause: libraries wrap the useful message in generic ones.

    The root's type is named when it is not ``error`` itself, since a bare message such as
    ``'text'`` says little without ``KeyError``.
    """
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = (str(root).strip() or type(root).__name__).splitlines()[0]
    return text if root is error else f"{type(root).__name__}: {text}"


def names_with_closest(names: Iterable[str], choices: Iterable[str]) -> str:
    """``'modle' (did you mean 'model'?), 'zzz'``: several unknown names, each with its closest."""
    choices = sorted(set(choices))
    listed = []
    for name in names:
        match = closest(name, choices)
        listed.append(f"{name!r} (did you mean {match!r}?)" if match else repr(name))
    return ", ".join(listed)
