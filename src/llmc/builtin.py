"""Core's own plugin: what llmc offers with no plugin installed.

Registered under the plugin name ``core`` through the same hooks a third-party plugin uses.
"""

from __future__ import annotations

from pathlib import Path

from llmc.experts_adapters import (
    ExpertsAdapter,
    GptOssExpertsAdapter,
    Llama4ExpertsAdapter,
    TransformersExpertsAdapter,
)
from llmc.hookspecs import hookimpl
from llmc.modifier import Modifier

RECIPES_DIR = Path(__file__).parent / "recipes"


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc.modifiers import QuantizationModifier

    return [QuantizationModifier]


@hookimpl
def llmc_register_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


@hookimpl
def llmc_register_experts_adapters() -> list[type[ExpertsAdapter]]:
    return [GptOssExpertsAdapter, Llama4ExpertsAdapter, TransformersExpertsAdapter]
