"""The ``sparsity`` plugin: SparseGPT, Wanda, magnitude and constant pruning, and their recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmc.hookspecs import hookimpl
from llmc.modifier import Modifier

RECIPES_DIR = Path(__file__).parent / "recipes"


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc_sparsity.constant_modifier import ConstantPruningModifier
    from llmc_sparsity.magnitude_modifier import MagnitudePruningModifier
    from llmc_sparsity.sparsegpt_modifier import SparseGPTModifier
    from llmc_sparsity.wanda_modifier import WandaPruningModifier

    return [SparseGPTModifier, WandaPruningModifier, MagnitudePruningModifier, ConstantPruningModifier]


@hookimpl
def llmc_register_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


@hookimpl
def llmc_checkpoint_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """A pruned model's checkpoint records its sparsity (``llmc_sparsity.config``)."""
    from llmc_sparsity.config import checkpoint_sparsity_config

    record = checkpoint_sparsity_config(model)
    return None if record is None else {"sparsity_config": record}
