"""``WandaPruningModifier``: prune by |weight| × input norm, from one calibration pass."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.modifier import TargetedModifier
from llmc_sparsity.base import (
    BlockwisePruningRun,
    PruneTarget,
    apply_kept_mask_,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_sparsity_spec,
)
from llmc_sparsity.masks_nm import parse_mask_structure
from llmc_sparsity.wanda import ColumnNormAccumulator, wanda_kept_mask

__all__ = ["WandaPruningModifier", "WandaRun"]


@attrs.frozen(kw_only=True)
class WandaPruningModifier(TargetedModifier):
    """Prune Linear weights by Wanda's score |W_ij|·‖X_j‖₂ (arXiv 2306.11695), no weight update.

    Weights compete within each output row (exactly round(sparsity · in_features) pruned per
    row), or within every group of M input columns for an N:M ``mask_structure``. ``sparsity``
    takes the same forms as SparseGPT's. Needs calibration data (one pass per block).
    """

    sparsity: Any = attrs.field(default=None, validator=check_sparsity_spec)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)

    def __attrs_post_init__(self) -> None:
        check_sparsity_matches_structure(self.sparsity, self.mask_structure)

    def start(self, context: RunContext) -> WandaRun:
        return WandaRun(config=self)


@attrs.define
class WandaRun(BlockwisePruningRun):
    """Run state: modules still to prune (``config`` is the ``WandaPruningModifier``). Linears
    that read one input (q/k/v) share its column norms."""

    def _input_statistic(self, module: torch.nn.Linear) -> ColumnNormAccumulator:
        return ColumnNormAccumulator.for_linear(module)

    def _prune_group(self, context: RunContext, group: list[PruneTarget], norms: ColumnNormAccumulator) -> None:
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        column_norms = norms.finalize()
        for target in group:
            kept = wanda_kept_mask(
                target.module.weight.detach(), column_norms,
                sparsity=target.sparsity, keep_n=keep_n, group_m=group_m,
            )
            apply_kept_mask_(
                context, target, kept, modifier=self.name, mask_structure=self.config.mask_structure
            )
