"""``ConstantPruningModifier``: keep the zeros a model already has, through training or quantization."""

from __future__ import annotations

import attrs
import torch

from llmc.context import RunContext
from llmc.masks import set_sparsity_mask_, sparsity_mask
from llmc.modifier import RunState, TargetedModifier
from llmc_sparsity.base import (
    PruneTarget,
    mask_gradients_,
    mask_weights_,
    plan_targets,
    record_module_sparsity,
)

__all__ = ["ConstantPruningModifier", "ConstantPruningRun"]


@attrs.frozen(kw_only=True)
class ConstantPruningModifier(TargetedModifier):
    """Hold every weight that is exactly zero at zero; data-free.

    In training, the gradients of zero weights are zeroed after the backward pass and the
    weights are masked again after each optimizer step (weight decay and momentum would
    otherwise move them). In one-shot, the zeros are recorded as sparsity masks, so a quantizer
    later in the recipe keeps them (fine-tuned sparse model → ``ConstantPruningModifier`` then
    GPTQ). Put it first in its stage.
    """

    supports_training = True
    requires_calibration_data = False


    def start(self, context: RunContext) -> ConstantPruningRun:
        return ConstantPruningRun(config=self)


@attrs.define
class ConstantPruningRun(RunState):
    """Run state: the targets whose zeros are held."""

    config: ConstantPruningModifier
    targets: dict[str, PruneTarget] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return type(self.config).recipe_name()

    @torch.no_grad()
    def _record_masks(self) -> None:
        for name, target in self.targets.items():
            kept = target.module.weight != 0
            previous = sparsity_mask(target.module)
            if previous is not None:
                kept &= previous
            set_sparsity_mask_(target.module, kept)
            # the sparsity to hold is the one the module has
            self.targets[name] = attrs.evolve(target, sparsity=round(1.0 - kept.float().mean().item(), 6))

    def llmc_initialize(self, context: RunContext) -> None:
        self.targets = plan_targets(
            context,
            modifier=self.name,
            targets=self.config.targets,
            ignore=self.config.ignore,
            sparsity=None,
            mask_structure="0:0",
            needs_block=False,
        )
        self._record_masks()

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        return False

    def llmc_finalize(self, context: RunContext) -> None:
        self._report(context)

    def llmc_train_start(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        self._record_masks()

    def llmc_train_after_backward(self, context: RunContext, step: int) -> None:
        mask_gradients_(self.targets.values())

    def llmc_train_optimizer_step_end(self, context: RunContext, step: int) -> None:
        mask_weights_(self.targets.values())

    def _report(self, context: RunContext) -> None:
        for target in self.targets.values():
            record_module_sparsity(context, target, modifier=self.name, mask_structure="0:0")
