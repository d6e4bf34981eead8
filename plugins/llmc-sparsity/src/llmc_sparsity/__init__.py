"""llmc-sparsity: pruning for llmc (SparseGPT, Wanda, magnitude, constant) and its recipes.

Recipes name the modifiers (``SparseGPTModifier: {sparsity: 0.5}``); the math is usable on its
own: ``sparsegpt_`` prunes a weight given the Cholesky factor of its inverse Hessian,
``wanda_kept_mask`` and ``magnitude_kept_mask`` choose masks, ``cubic_sparsity`` is the
gradual schedule, ``checkpoint_sparsity_config`` describes a pruned model for its checkpoint.
"""

from __future__ import annotations

from llmc_sparsity.config import checkpoint_sparsity_config
from llmc_sparsity.constant_modifier import ConstantPruningModifier
from llmc_sparsity.magnitude_modifier import MagnitudePruningModifier, magnitude_kept_mask
from llmc_sparsity.masks_nm import (
    nm_kept_mask,
    parse_mask_structure,
    row_kept_mask,
    tensor_kept_mask,
)
from llmc_sparsity.schedule import cubic_sparsity, scheduled_sparsity
from llmc_sparsity.sparsegpt import sparsegpt_
from llmc_sparsity.sparsegpt_modifier import SparseGPTModifier
from llmc_sparsity.wanda import wanda_kept_mask, wanda_scores
from llmc_sparsity.wanda_modifier import WandaPruningModifier

__all__ = [
    "ConstantPruningModifier",
    "MagnitudePruningModifier",
    "SparseGPTModifier",
    "WandaPruningModifier",
    "checkpoint_sparsity_config",
    "cubic_sparsity",
    "magnitude_kept_mask",
    "nm_kept_mask",
    "parse_mask_structure",
    "row_kept_mask",
    "scheduled_sparsity",
    "sparsegpt_",
    "tensor_kept_mask",
    "wanda_kept_mask",
    "wanda_scores",
]
