"""llmc: compress Hugging Face language models with recipes and plugins.

``oneshot`` calibrates and compresses; ``train`` fine-tunes with modifiers active; ``llmc.hookspecs`` is the plugin API; ``Modifier`` is
the base class of everything a recipe can name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmc.args import (
    DatasetArguments,
    ModelArguments,
    OutputArguments,
    RecipeArguments,
    TrainingArguments,
)
from llmc.context import RunContext
from llmc.errors import (
    ArgumentError,
    CalibrationError,
    DataError,
    LlmcError,
    ModelLoadError,
    PluginError,
    RecipeError,
    SaveError,
)
from llmc.hookspecs import hookimpl
from llmc.modifier import Modifier

if TYPE_CHECKING:
    from llmc.entrypoints.oneshot import OneshotResult, oneshot
    from llmc.entrypoints.train import TrainResult, train

__all__ = [
    "ArgumentError",
    "CalibrationError",
    "DataError",
    "DatasetArguments",
    "LlmcError",
    "ModelArguments",
    "ModelLoadError",
    "Modifier",
    "OneshotResult",
    "OutputArguments",
    "PluginError",
    "RecipeArguments",
    "RecipeError",
    "RunContext",
    "SaveError",
    "TrainResult",
    "TrainingArguments",
    "hookimpl",
    "oneshot",
    "train",
]


def __getattr__(name: str) -> Any:
    # The entrypoint pulls in transformers and datasets; import it only when it is used.
    if name in ("oneshot", "OneshotResult"):
        from llmc.entrypoints import oneshot as module

        return getattr(module, name)
    if name in ("train", "TrainResult"):
        from llmc.entrypoints import train as module

        return getattr(module, name)
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")
