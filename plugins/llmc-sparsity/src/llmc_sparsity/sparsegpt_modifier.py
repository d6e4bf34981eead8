"""``SparseGPTModifier``: one-shot pruning with second-order error compensation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.hessian import (
    HessianAccumulator,
    attach_shared_hessian_hooks,
    inverse_cholesky_upper,
    zero_dead_columns_,
)
from llmc.modifier import Modifier
from llmc.pipeline import StopLayerForward
from llmc_sparsity.base import (
    BlockwisePruningRun,
    PruneTarget,
    apply_kept_mask_,
    as_list,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_sparsity_spec,
    skip_unreached,
)
from llmc_sparsity.masks_nm import parse_mask_structure
from llmc_sparsity.sparsegpt import sparsegpt_

__all__ = ["SparseGPTModifier", "SparseGPTRun"]


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"'{attribute.name}' must be a positive integer (got {value!r})")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"'{attribute.name}' must be >= 0 (got {value!r})")


@attrs.frozen(kw_only=True)
class SparseGPTModifier(Modifier):
    """Prune Linear weights with SparseGPT (arXiv 2301.00774): OBS saliency and error updates.

    ``sparsity``: a number, one per block, or {target: number} (see ``llmc_sparsity.base``);
    default 0.5, or 1 − N/M with an N:M ``mask_structure`` ('0:0' unstructured, '2:4' = 2 kept
    of every 4 input columns). ``block_size`` columns are solved per lazy update;
    ``dampening_frac`` · mean(diag H) is added to the Hessian's diagonal (raised automatically
    when the Hessian is not positive definite). Modules outside the decoder blocks cannot be
    calibrated and must be ignored (``lm_head`` is by default).

    ``true_sequential``: Linears that read the same input form a group (q/k/v, o, gate/up,
    down); after each group is pruned the layer is run again, as far as the next group, so that
    group's Hessian is computed from the outputs of the pruned ones (as GPTQ's true-sequential
    order). Costs partial extra forwards of every layer. Other modifiers' hooks see these
    re-runs, so put data-driven quantizers (GPTQ) in a later stage when it is on.
    """

    sparsity: Any = attrs.field(default=None, validator=check_sparsity_spec)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)
    block_size: int = attrs.field(default=128, validator=_positive)
    dampening_frac: float = attrs.field(default=0.01, validator=_non_negative)
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=as_list)
    true_sequential: bool = False

    def __attrs_post_init__(self) -> None:
        check_sparsity_matches_structure(self.sparsity, self.mask_structure)
        _, group_m = parse_mask_structure(self.mask_structure)
        if group_m and self.block_size % group_m:
            raise ValueError(
                f"block_size {self.block_size} must be a multiple of the N:M group size {group_m}"
            )

    def start(self, context: RunContext) -> SparseGPTRun:
        return SparseGPTRun(config=self)


@attrs.define
class SparseGPTRun(BlockwisePruningRun):
    """Run state: the modules still to prune (``config`` is the ``SparseGPTModifier``), and the
    Hessians of the current block."""

    hessians: dict[str, HessianAccumulator] = attrs.field(factory=dict)

    def _attach_hooks(self, modules: dict[str, torch.nn.Linear], context: RunContext) -> Callable[[], None]:
        self.hessians, remove = attach_shared_hessian_hooks(modules, context)
        return remove

    def _prune_block(self, context: RunContext, layer_name: str) -> None:
        targets = {target.name: target for target in self._in_layer(layer_name)}
        for name in targets:
            del self.pending[name]
        hessians, self.hessians = self.hessians, {}
        # Groups: the modules sharing one accumulator (one input), in the order they ran.
        groups: dict[int, list[PruneTarget]] = {}
        for name, accumulator in hessians.items():
            groups.setdefault(id(accumulator), []).append(targets[name])
        for target in targets.values():
            if target.name not in hessians:
                skip_unreached(context, target, modifier=self.name, mask_structure=self.config.mask_structure)
        for index, group in enumerate(groups.values()):
            if index and self.config.true_sequential:
                hessian = self._recalibrate(context, layer_name, group)
            else:
                hessian = hessians[group[0].name]
            self._prune_group(context, group, hessian)

    def _recalibrate(self, context: RunContext, layer_name: str, group: list[PruneTarget]) -> HessianAccumulator:
        """Run the layer as it now is, up to ``group``, and return the group's Hessian."""
        if context.forward_layer is None:
            raise CalibrationError(
                f"true_sequential needs to re-run {layer_name}, but the pipeline offers no "
                "context.forward_layer; set true_sequential: false",
                module=layer_name,
            )
        modules = {target.name: target.module for target in group}
        hessians, remove = attach_shared_hessian_hooks(modules, context)
        fired: set[str] = set()

        def stop_after(name: str) -> Callable[..., None]:
            def hook(_: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                fired.add(name)
                if len(fired) == len(modules):  # the group has run: the rest of the batch is not needed
                    fired.clear()
                    raise StopLayerForward

            return hook

        handles = [module.register_forward_hook(stop_after(name)) for name, module in modules.items()]
        try:
            context.forward_layer()
        finally:
            remove()
            for handle in handles:
                handle.remove()
        return hessians[group[0].name]

    @torch.no_grad()
    def _prune_group(self, context: RunContext, group: list[PruneTarget], hessian: HessianAccumulator) -> None:
        """Prune the modules of one group; they share H, its dead columns and its Cholesky factor."""
        if hessian.tokens == 0:
            for target in group:
                skip_unreached(context, target, modifier=self.name, mask_structure=self.config.mask_structure)
            return
        weights = [
            target.module.weight.detach().to(device=hessian.H.device, dtype=torch.float32, copy=True)
            for target in group
        ]
        dead = zero_dead_columns_(hessian.H, weights[0])
        U, damping = inverse_cholesky_upper(hessian.H, self.config.dampening_frac, module_name=group[0].name)
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        for target, W in zip(group, weights):
            W[:, dead] = 0.0
            result = sparsegpt_(
                W, U, sparsity=target.sparsity, keep_n=keep_n, group_m=group_m,
                block_size=self.config.block_size,
            )
            apply_kept_mask_(
                context, target, result.kept, modifier=self.name,
                mask_structure=self.config.mask_structure, new_weight=W,
                obs_loss=result.loss, damping=damping,
            )
