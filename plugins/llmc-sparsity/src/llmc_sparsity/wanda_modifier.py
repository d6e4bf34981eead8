"""``WandaPruningModifier``: prune by |weight| × input norm, from one calibration pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.modifier import Modifier
from llmc_sparsity.base import (
    BlockwisePruningRun,
    apply_kept_mask_,
    as_list,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_sparsity_spec,
    skip_unreached,
)
from llmc_sparsity.masks_nm import parse_mask_structure
from llmc_sparsity.wanda import ColumnNormAccumulator, wanda_kept_mask

__all__ = ["WandaPruningModifier", "WandaRun", "attach_column_norm_hooks"]


def attach_column_norm_hooks(
    modules: Mapping[str, torch.nn.Linear], context: RunContext
) -> tuple[dict[str, ColumnNormAccumulator], Callable[[], None]]:
    """Start accumulating ‖X_j‖² for each module; returns the accumulators and a remover."""
    accumulators = {name: ColumnNormAccumulator.for_linear(module) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():

        def hook(_: torch.nn.Module, args: tuple, accumulator: ColumnNormAccumulator = accumulators[name]) -> None:
            accumulator.add_(args[0].detach(), context.attention_mask)

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return accumulators, remove


@attrs.frozen(kw_only=True)
class WandaPruningModifier(Modifier):
    """Prune Linear weights by Wanda's score |W_ij|·‖X_j‖₂ (arXiv 2306.11695), no weight update.

    Weights compete within each output row (exactly round(sparsity · in_features) pruned per
    row), or within every group of M input columns for an N:M ``mask_structure``. ``sparsity``
    takes the same forms as SparseGPT's. Needs calibration data (one pass per block).
    """

    sparsity: Any = attrs.field(default=None, validator=check_sparsity_spec)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=as_list)

    def __attrs_post_init__(self) -> None:
        check_sparsity_matches_structure(self.sparsity, self.mask_structure)

    def start(self, context: RunContext) -> WandaRun:
        return WandaRun(config=self)


@attrs.define
class WandaRun(BlockwisePruningRun):
    """Run state: modules still to prune (``config`` is the ``WandaPruningModifier``) and the
    input norms of the current block."""

    norms: dict[str, ColumnNormAccumulator] = attrs.field(factory=dict)

    def _attach_hooks(self, modules: dict[str, torch.nn.Linear], context: RunContext) -> Callable[[], None]:
        self.norms, remove = attach_column_norm_hooks(modules, context)
        return remove

    def _prune_block(self, context: RunContext, layer_name: str) -> None:
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        for target in self._in_layer(layer_name):
            del self.pending[target.name]
            statistics = self.norms.pop(target.name)
            if statistics.tokens == 0:
                skip_unreached(context, target, modifier=self.name, mask_structure=self.config.mask_structure)
                continue
            norms = statistics.norms
            kept = wanda_kept_mask(
                target.module.weight.detach(), norms,
                sparsity=target.sparsity, keep_n=keep_n, group_m=group_m,
            )
            apply_kept_mask_(
                context, target, kept, modifier=self.name, mask_structure=self.config.mask_structure
            )
        self.norms = {}
