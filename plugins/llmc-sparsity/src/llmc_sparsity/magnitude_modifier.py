"""``MagnitudePruningModifier``: prune the smallest weights, at once or gradually in training."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import ArgumentError, CalibrationError
from llmc.masks import sparsity_mask
from llmc.modifier import RunState, TargetedModifier
from llmc_sparsity.base import (
    PruneTarget,
    apply_kept_mask_,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_unit_interval,
    mask_gradients_,
    mask_weights_,
    plan_targets,
    record_module_sparsity,
)
from llmc_sparsity.masks_nm import (
    nm_kept_mask,
    parse_mask_structure,
    structure_sparsity,
    tensor_kept_mask,
)
from llmc_sparsity.schedule import scheduled_sparsity

__all__ = ["MagnitudePruningModifier", "MagnitudeRun", "magnitude_kept_mask"]

logger = logging.getLogger("llmc_sparsity.magnitude")


def magnitude_kept_mask(
    weight: torch.Tensor,
    sparsity: float,
    *,
    keep_n: int = 0,
    group_m: int = 0,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the largest |w|: exactly round(sparsity · numel) pruned per tensor, or N:M per row.

    With ``kept`` (the previous mask) the masks are nested: what was pruned stays pruned.
    """
    scores = weight.detach().float().abs()
    if group_m:
        return nm_kept_mask(scores, keep_n, group_m, kept)
    return tensor_kept_mask(scores, sparsity, kept)


def _optional_fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        check_unit_interval(instance, attribute, value)


def _optional_non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ArgumentError(f"'{attribute.name}' must be a number of epochs >= 0 (got {value!r})")


@attrs.frozen(kw_only=True)
class MagnitudePruningModifier(TargetedModifier):
    """Zero the smallest-magnitude weights of each Linear; data-free.

    One-shot: each targeted Linear is pruned to ``final_sparsity`` (default 0.5; exactly
    round(s · numel) weights per Linear, or N:M per row with ``mask_structure``). In training,
    sparsity follows the cubic schedule s(t) = final + (init − final)(1 − (t − start)/(end − start))³
    with ``start_epoch``, ``end_epoch`` and ``update_epochs`` in epochs (llm-compressor's
    ``start``, ``end``, ``update``; ``start`` is taken by ``Modifier.start``): masks change
    only at the update points start, start + update, ... and end, they are nested (a pruned
    weight stays pruned), and pruned weights and their gradients are held at zero through
    every optimizer step. With an N:M structure the mask is applied once, at ``start_epoch``.
    """

    supports_training = True
    requires_calibration_data = False

    init_sparsity: float = attrs.field(default=0.0, validator=check_unit_interval)
    final_sparsity: float | None = attrs.field(default=None, validator=_optional_fraction)
    start_epoch: float = attrs.field(default=0.0, validator=_optional_non_negative)
    end_epoch: float | None = attrs.field(default=None, validator=_optional_non_negative)
    update_epochs: float | None = attrs.field(default=None, validator=_optional_non_negative)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)

    def __attrs_post_init__(self) -> None:
        check_sparsity_matches_structure(self.final_sparsity, self.mask_structure)
        if self.init_sparsity > self.target_sparsity:
            raise ArgumentError(
                f"'init_sparsity' ({self.init_sparsity}) must not exceed 'final_sparsity' "
                f"({self.target_sparsity}): masks are nested, pruned weights never come back"
            )
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ArgumentError(
                f"'end_epoch' ({self.end_epoch}) must not be before 'start_epoch' ({self.start_epoch})"
            )
        if self.update_epochs is not None and self.update_epochs <= 0:
            raise ArgumentError(f"'update_epochs' must be a positive number of epochs (got {self.update_epochs!r})")

    @property
    def target_sparsity(self) -> float:
        keep_n, group_m = parse_mask_structure(self.mask_structure)
        if group_m:
            return structure_sparsity(keep_n, group_m)
        return 0.5 if self.final_sparsity is None else self.final_sparsity

    def start(self, context: RunContext) -> MagnitudeRun:
        return MagnitudeRun(config=self)


@attrs.define
class MagnitudeRun(RunState):
    """Run state: the targets, and in training the last update point applied."""

    config: MagnitudePruningModifier
    targets: dict[str, PruneTarget] = attrs.field(factory=dict)
    pruned: set[str] = attrs.field(factory=set)
    training: bool = False
    steps_per_epoch: int = 1
    last_point: float | None = None
    current_sparsity: float = 0.0

    @property
    def name(self) -> str:
        return type(self.config).recipe_name()

    def _prune(self, context: RunContext, target: PruneTarget, sparsity: float, *, record: bool) -> None:
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        kept = magnitude_kept_mask(
            target.module.weight, sparsity, keep_n=keep_n, group_m=group_m,
            kept=sparsity_mask(target.module),
        )
        apply_kept_mask_(
            context, target, kept, modifier=self.name,
            mask_structure=self.config.mask_structure, record=record,
        )

    def llmc_initialize(self, context: RunContext) -> None:
        self.targets = plan_targets(
            context,
            modifier=self.name,
            targets=self.config.targets,
            ignore=self.config.ignore,
            sparsity=self.config.target_sparsity,
            mask_structure=self.config.mask_structure,
            needs_block=False,
        )

    # --- one-shot: prune each block as the pipeline reaches it, the rest at the end ----------

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        return False

    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        for target in self.targets.values():
            if target.block == layer_name and target.name not in self.pruned:
                self._prune(context, target, target.sparsity, record=True)
                self.pruned.add(target.name)

    def llmc_finalize(self, context: RunContext) -> None:
        if not self.training:
            for target in self.targets.values():
                if target.name not in self.pruned:
                    self._prune(context, target, target.sparsity, record=True)
                    self.pruned.add(target.name)

    # --- training: the cubic schedule, masks held through every optimizer step ---------------

    def llmc_train_start(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        config = self.config
        _, group_m = parse_mask_structure(config.mask_structure)
        if not group_m and (config.end_epoch is None or config.update_epochs is None):
            raise CalibrationError(
                f"{self.name} prunes gradually during training and needs 'end_epoch' and "
                f"'update_epochs' (got end_epoch={config.end_epoch}, update_epochs="
                f"{config.update_epochs}); for example start_epoch: 0, end_epoch: 2, update_epochs: 0.25"
            )
        self.training = True
        self.steps_per_epoch = max(1, context.steps_per_epoch or 1)
        self.last_point = None

    def _scheduled(self, epoch: float) -> tuple[float, float] | None:
        config = self.config
        _, group_m = parse_mask_structure(config.mask_structure)
        if group_m:  # a structure is not reached gradually: applied once, at start
            started = epoch + 1e-9 >= config.start_epoch
            return (config.start_epoch, config.target_sparsity) if started else None
        return scheduled_sparsity(
            epoch, init_sparsity=config.init_sparsity, final_sparsity=config.target_sparsity,
            start=config.start_epoch, end=config.end_epoch, update=config.update_epochs,
        )

    def llmc_train_batch_start(self, context: RunContext, step: int) -> None:
        scheduled = self._scheduled(step / self.steps_per_epoch)
        if scheduled is None or scheduled[0] == self.last_point:
            return
        point, fraction = scheduled
        self.last_point = point
        for target in self.targets.values():
            self._prune(context, target, fraction, record=False)
        self.current_sparsity = fraction
        logger.info("%s: step %d (epoch %.3f): sparsity %.4f", self.name, step, point, fraction)

    def llmc_train_after_backward(self, context: RunContext, step: int) -> None:
        mask_gradients_(self.targets.values())

    def llmc_train_optimizer_step_end(self, context: RunContext, step: int) -> None:
        mask_weights_(self.targets.values())

    def llmc_train_end(self, context: RunContext) -> None:
        for target in self.targets.values():
            record_module_sparsity(
                context, target, modifier=self.name, mask_structure=self.config.mask_structure,
                scheduled_sparsity=round(self.current_sparsity, 6),
            )
