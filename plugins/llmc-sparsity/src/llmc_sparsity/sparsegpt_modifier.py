"""``SparseGPTModifier``: one-shot pruning with second-order error compensation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.hessian import (
    HessianAccumulator,
    attach_shared_hessian_hooks,
    inverse_cholesky_upper,
    zero_dead_columns_,
)
from llmc.hookspecs import hookimpl
from llmc.modifier import Modifier
from llmc_sparsity.base import (
    PruneTarget,
    apply_kept_mask_,
    as_list,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_sparsity_spec,
    plan_targets,
    record_model_sparsity,
    skip_unreached,
)
from llmc_sparsity.masks_nm import parse_mask_structure
from llmc_sparsity.sparsegpt import sparsegpt_

__all__ = ["SparseGPTModifier", "SparseGPTRun"]

logger = logging.getLogger("llmc_sparsity.sparsegpt")


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
    """

    sparsity: Any = attrs.field(default=None, validator=check_sparsity_spec)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)
    block_size: int = attrs.field(default=128, validator=_positive)
    dampening_frac: float = attrs.field(default=0.01, validator=_non_negative)
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=as_list)

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
class SparseGPTRun:
    """Run state: the modules still to prune, and the Hessians of the current block."""

    config: SparseGPTModifier
    pending: dict[str, PruneTarget] = attrs.field(factory=dict)
    hessians: dict[str, HessianAccumulator] = attrs.field(factory=dict)
    remove_hooks: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return type(self.config).recipe_name()

    @hookimpl
    def llmc_initialize(self, context: RunContext) -> None:
        self.pending = plan_targets(
            context,
            modifier=self.name,
            targets=self.config.targets,
            ignore=self.config.ignore,
            sparsity=self.config.sparsity,
            mask_structure=self.config.mask_structure,
            needs_block=True,
        )
        logger.info("%s: %d Linear modules to prune", self.name, len(self.pending))

    def _in_layer(self, layer_name: str) -> list[PruneTarget]:
        return [target for target in self.pending.values() if target.block == layer_name]

    @hookimpl
    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        modules = {target.name: target.module for target in self._in_layer(layer_name)}
        if not modules:
            return False
        self.hessians, self.remove_hooks = attach_shared_hessian_hooks(modules, context)
        return True

    @hookimpl
    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        if self.remove_hooks is not None:
            self.remove_hooks()
            self.remove_hooks = None
        # Modules that read the same input share H, so also its dead columns and Cholesky factor.
        factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for target in self._in_layer(layer_name):
            del self.pending[target.name]
            hessian = self.hessians.pop(target.name, None)
            if hessian is None or hessian.tokens == 0:
                skip_unreached(context, target, modifier=self.name, mask_structure=self.config.mask_structure)
                continue
            W = target.module.weight.detach().to(device=hessian.H.device, dtype=torch.float32, copy=True)
            if id(hessian) not in factors:
                dead = zero_dead_columns_(hessian.H, W)
                U, damping = inverse_cholesky_upper(
                    hessian.H, self.config.dampening_frac, module_name=target.name
                )
                factors[id(hessian)] = (dead, U, damping)
            dead, U, damping = factors[id(hessian)]
            W[:, dead] = 0.0
            self._prune(context, target, W, U, damping)
            if not any(h is hessian for h in self.hessians.values()):
                del factors[id(hessian)]  # the last module of its group: release H⁻¹'s factor
        self.hessians = {}

    @hookimpl
    def llmc_finalize(self, context: RunContext) -> None:
        record_model_sparsity(context, self.name)
        self.pending.clear()

    @torch.no_grad()
    def _prune(
        self, context: RunContext, target: PruneTarget, W: torch.Tensor, U: torch.Tensor, damping: float
    ) -> None:
        """Prune ``target`` given its float32 weight copy ``W`` and U = chol(H⁻¹) upper."""
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        result = sparsegpt_(
            W, U, sparsity=target.sparsity, keep_n=keep_n, group_m=group_m,
            block_size=self.config.block_size,
        )
        apply_kept_mask_(
            context, target, result.kept, modifier=self.name,
            mask_structure=self.config.mask_structure, new_weight=W,
            obs_loss=result.loss, damping=damping,
        )
