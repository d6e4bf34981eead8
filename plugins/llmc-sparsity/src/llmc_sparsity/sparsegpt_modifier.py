"""``SparseGPTModifier``: one-shot pruning with second-order error compensation."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.distributed import RowSplit, row_bounds
from llmc.errors import ArgumentError
from llmc.hessian import (
    HessianAccumulator,
    inverse_cholesky_upper_batch,
    zero_dead_columns_,
)
from llmc.modifier import TargetedModifier
from llmc.statistics import GroupSolver, InputGroup
from llmc.validators import is_bool, is_number_in, is_positive_int
from llmc_sparsity.base import (
    BlockwisePruningRun,
    PruneTarget,
    apply_kept_mask_,
    check_mask_structure,
    check_sparsity_matches_structure,
    check_sparsity_spec,
)
from llmc_sparsity.masks_nm import parse_mask_structure
from llmc_sparsity.sparsegpt import sparsegpt_batch_

__all__ = ["SparseGPTModifier", "SparseGPTRun"]


@attrs.frozen(kw_only=True)
class SparseGPTModifier(TargetedModifier):
    """Prune Linear weights with SparseGPT (arXiv 2301.00774): OBS saliency and error updates.

    ``sparsity``: a number, one per block, or {target: number} (see ``llmc_sparsity.base``);
    default 0.5, or 1 − N/M with an N:M ``mask_structure`` ('0:0' unstructured, '2:4' = 2 kept
    of every 4 input columns). ``block_size`` columns are solved per lazy update;
    ``dampening_frac`` · mean(diag H) is added to the Hessian's diagonal (raised automatically
    when the Hessian is not positive definite). Modules outside the decoder blocks cannot be
    calibrated and must be ignored (``lm_head`` is by default).

    ``true_sequential``: Linears that read the same input form a group (q/k/v, o, gate/up,
    down); after each group is pruned the layer is run again, as far as the next group, so that
    group's Hessian is computed from the outputs of the pruned ones (the same stages as GPTQ's,
    from core's ``llmc.statistics``). Costs partial extra forwards of every layer. Other
    modifiers' hooks see these re-runs, so put data-driven quantizers (GPTQ) in a later stage
    when it is on.
    """

    sparsity: Any = attrs.field(default=None, validator=check_sparsity_spec)
    mask_structure: str = attrs.field(default="0:0", validator=check_mask_structure)
    block_size: int = attrs.field(default=128, validator=is_positive_int)
    dampening_frac: float = attrs.field(
        default=0.01, validator=is_number_in(0, None, description="a number >= 0")
    )
    true_sequential: bool = attrs.field(default=False, validator=is_bool)

    def __attrs_post_init__(self) -> None:
        check_sparsity_matches_structure(self.sparsity, self.mask_structure)
        _, group_m = parse_mask_structure(self.mask_structure)
        if group_m and self.block_size % group_m:
            raise ArgumentError(
                f"block_size {self.block_size} must be a multiple of the N:M group size {group_m}",
                name="block_size",
            )

    def start(self, context: RunContext) -> SparseGPTRun:
        return SparseGPTRun(config=self)


@attrs.frozen
class PrunedGroup:
    """SparseGPT's result for one input group: per module the new weight (float32, zero
    where pruned), the kept mask and the OBS loss; and the damping used (sent between ranks)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    damping: float


@attrs.frozen
class PreparedFactor:
    """A group's factorisation, made by one rank for the ranks that share its rows."""

    U: torch.Tensor
    dead: torch.Tensor
    damping: float


@attrs.define
class SparseGPTRun(BlockwisePruningRun):
    """Run state: the modules still to prune (``config`` is the ``SparseGPTModifier``)."""

    def _input_statistic(self, module: torch.nn.Linear) -> HessianAccumulator:
        return HessianAccumulator.for_linear(module)

    def _solver(self, context: RunContext) -> GroupSolver:
        return GroupSolver(
            compute=self._compute_group,
            apply=lambda group, pruned: self._apply_group(context, group, pruned),
            batch_key=self._batch_key,
            compute_batch=self._compute_batch,
            split=RowSplit(
                prepare=self._prepare_group, compute_rows=self._compute_rows, join=self._join_rows,
                can_split=self._can_split,
            ),
        )

    def _targets(self, group: InputGroup) -> list[PruneTarget]:
        """The group's modules still to prune, in the group's order."""
        return [self.pending[name] for name in group.names if name in self.pending]

    def _batch_key(self, group: InputGroup) -> tuple | None:
        """Groups with equal keys are pruned as one batch (``_compute_batch``): the experts of an
        MoE block, whose modules have the same shapes, each with its own Hessian."""
        targets = self._targets(group)
        if group.statistic is None or not targets:
            return None
        return tuple(
            (tuple(target.module.weight.shape), str(target.module.weight.device)) for target in targets
        )

    @torch.no_grad()
    def _compute_batch(self, groups: list[InputGroup]) -> list[PrunedGroup]:
        """``_compute_group`` of groups of one ``_batch_key`` (or of one group): their Hessians
        factored together (``llmc.hessian.inverse_cholesky_upper_batch``), then per module
        position one batched sweep (``sparsegpt_batch_``); on CPU each group's result is exactly
        that of a batch of that group alone."""
        members = [self._targets(group) for group in groups]
        hessians = [group.statistic.finalize() for group in groups]

        def stacked(position: int) -> torch.Tensor:  # [E, rows, cols] float32 copies
            weights = [targets[position].module.weight for targets in members]
            out = torch.empty((len(groups), *weights[0].shape), dtype=torch.float32, device=hessians[0].device)
            for slot, weight in zip(out, weights):
                slot.copy_(weight.detach())
            return out

        first: torch.Tensor | None = stacked(0)
        deads = [zero_dead_columns_(H, W) for H, W in zip(hessians, first)]
        U, dampings = inverse_cholesky_upper_batch(
            hessians, self.config.dampening_frac, module_names=[targets[0].name for targets in members]
        )
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        pruned: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = [{} for _ in groups]
        for position in range(len(members[0])):
            W = first if first is not None else stacked(position)
            first = None
            for slot, dead in zip(W, deads):
                slot[:, dead] = 0.0
            results = sparsegpt_batch_(
                W, U, sparsities=[targets[position].sparsity for targets in members], keep_n=keep_n,
                group_m=group_m, block_size=self.config.block_size,
            )
            for index, (targets, result) in enumerate(zip(members, results)):
                weight = W[index] if len(groups) == 1 else W[index].clone()  # own storage, sent between ranks
                pruned[index][targets[position].name] = (weight, result.kept, result.loss)
            del W
        return [PrunedGroup(modules, damping) for modules, damping in zip(pruned, dampings)]

    def _compute_group(self, group: InputGroup) -> PrunedGroup | None:
        """Prune copies of the group's pending modules; they share H, its dead columns and its
        Cholesky factor (nothing installed: under torchrun another rank may apply it)."""
        if group.statistic is None or not any(name in self.pending for name in group.names):
            return None
        return self._compute_batch([group])[0]

    def _can_split(self, group: InputGroup) -> bool:
        """N:M masks are chosen row by row, so ranks can share a group's rows; an unstructured
        mask is chosen over all rows of a block at once, so it cannot be split."""
        _, group_m = parse_mask_structure(self.config.mask_structure)
        return bool(group_m) and group.statistic is not None and any(name in self.pending for name in group.names)

    @torch.no_grad()
    def _prepare_group(self, group: InputGroup) -> PreparedFactor:
        """The group's dead inputs and Cholesky factor, shared by its modules' rows."""
        assert group.statistic is not None
        H = group.statistic.finalize()
        targets = self._targets(group)
        dead = zero_dead_columns_(H, torch.empty(0, H.shape[0], device=H.device))
        U, (damping,) = inverse_cholesky_upper_batch([H], self.config.dampening_frac, module_names=[targets[0].name])
        return PreparedFactor(U[0], dead, damping)

    @torch.no_grad()
    def _compute_rows(
        self, group: InputGroup, prepared: PreparedFactor, start: float, stop: float
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The rows between fractions ``start`` and ``stop`` of each module, pruned from the
        shared factor: on CPU exactly those rows of the whole module's result."""
        keep_n, group_m = parse_mask_structure(self.config.mask_structure)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for target in self._targets(group):
            first, last = row_bounds(target.module.weight.shape[0], start, stop)
            if last <= first:
                continue
            W = target.module.weight.detach()[first:last].to(device=prepared.U.device, dtype=torch.float32, copy=True)
            W[:, prepared.dead] = 0.0
            (result,) = sparsegpt_batch_(
                W[None], prepared.U[None], sparsities=[target.sparsity], keep_n=keep_n, group_m=group_m,
                block_size=self.config.block_size,
            )
            parts[target.name] = (W, result.kept, result.loss)
        return parts

    def _join_rows(
        self, group: InputGroup, prepared: PreparedFactor, parts: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
    ) -> PrunedGroup:
        """The group's result from its rows' parts, in row order (``_compute_batch``'s)."""
        modules = {}
        for name in [target.name for target in self._targets(group)]:
            pieces = [part[name] for part in parts if name in part]
            modules[name] = (
                torch.cat([piece[0] for piece in pieces]),
                torch.cat([piece[1] for piece in pieces]),
                sum(piece[2] for piece in pieces),
            )
        return PrunedGroup(modules, prepared.damping)

    def _apply_group(self, context: RunContext, group: InputGroup, pruned: PrunedGroup | None) -> None:
        if pruned is None:
            if group.statistic is None:  # no token reached it: left dense, reported
                self._prune_groups(context, [group])
            return
        for name, (W, kept, loss) in pruned.modules.items():
            apply_kept_mask_(
                context, self.pending.pop(name), kept, modifier=self.name,
                mask_structure=self.config.mask_structure, new_weight=W,
                obs_loss=loss, damping=pruned.damping,
            )
