"""``GPTQRun``: the run state of a ``GPTQModifier``, which calibrates and quantizes.

Per decoder layer::

    llmc_layer_start   core's LayerCalibration hooks the layer's target Linears: one Hessian
                       H = 2/N Σ xxᵀ per input group (q/k/v share one), the output energy of
                       wide Linears (llmc_gptq.statistics)
    calibration pass   (core) every batch through the layer, cut short once the last target
                       Linear has its input, unless another modifier has hooks on the layer
    llmc_layer_end     solve each input group (llmc_gptq.gptq: one inverse Cholesky factor per
                       group and act-order) and install the results
                       (llmc.quantization.set_quantized_weight_); groups of one shape (MoE
                       experts) are solved as one batch; with true_sequential core re-runs
                       the layer between groups (llmc.statistics)

Static input scales and the KV cache's scales (``llmc.calibration``) are observed in the same
calibration pass, on the inputs the layer receives from the compressed layers before it, and
set before the layer's weights are solved, so true-sequential re-runs already quantize them.
"""

from __future__ import annotations

import logging
import time

import attrs
import torch

from llmc.calibration import ActivationCalibration
from llmc.context import RunContext
from llmc.distributed import RowSplit, row_bounds
from llmc.hessian import HessianAccumulator
from llmc.masks import clear_sparsity_mask_, sparsity_mask
from llmc.modifier import RunState
from llmc.modifiers.quantization import describe_scheme
from llmc.quantization import (
    QuantizationScheme,
    quantize_linear_,
    set_quantized_weight_,
    take_global_scale,
)
from llmc.report import relative_error
from llmc.statistics import GroupSolver, InputGroup, LayerCalibration
from llmc_gptq.config import GPTQModifier
from llmc_gptq.gptq import (
    GPTQResult,
    PreparedHessian,
    gptq_quantize_batch,
    prepare_hessians,
    reference_energy,
)
from llmc_gptq.statistics import output_energy_for

__all__ = ["GPTQRun"]

logger = logging.getLogger("llmc.gptq")


def _energy(group: InputGroup, name: str, module: torch.nn.Linear, H: torch.Tensor) -> float | None:
    """``trace(W H Wᵀ)``, what a module's output error is relative to: summed from its outputs
    during calibration (wide inputs), or one small product from ``H`` (narrow ones)."""
    energy = group.outputs.get(name)
    if energy is not None:
        return energy.finalize()
    return reference_energy(module.weight.detach(), H, kept=sparsity_mask(module))


@attrs.frozen
class SolvedModule:
    """One module's GPTQ result with what its report row needs (sent between ranks)."""

    result: GPTQResult
    tokens: int
    hessian_seconds: float


@attrs.frozen
class PreparedGroup:
    """A group's factorisation and what its modules' report rows need (``_prepare_groups``);
    made by one rank for the ranks that share its rows (``llmc.distributed.RowSplit``)."""

    hessians: dict[bool, PreparedHessian]  # per act-order
    energies: dict[str, float | None]
    tokens: int


# The row sweeps of these schemes depend on nothing outside a row: its own scales and codes.
_ROW_STRATEGIES = ("channel", "group")


@attrs.define
class GPTQRun(RunState):
    """Run state of a ``GPTQModifier``: pending modules and the layer calibration.

    ``lazy_group_params`` (False) fixes the group scales up front from the original weights, as
    llm-compressor does, which gave lower perplexity on both real models measured; True
    computes a group's scale when the sweep reaches it, from the error-updated weights (the
    paper's reference code; kept for comparisons, see docs/benchmarks.md).
    ``keep_sparsity_mask`` (True) keeps the zeros a pruning step left before GPTQ in one stage
    (``sparsegpt-2:4`` + W4 stays 2:4, what sparse kernels need); False lets GPTQ's updates fill
    them and drops the mask, what llm-compressor 0.14 does (for comparisons only: that
    checkpoint is no longer sparse).
    ``backend`` picks the sweep: "auto" (numba on CPU, torch on GPU), "numba" or "torch".
    """

    config: GPTQModifier
    schemes: list[QuantizationScheme]
    pending: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)
    # NVFP4 global scales, computed for fused siblings (q/k/v, gate/up) together while all of
    # them are still pending, so that vLLM's fused matrix has one
    global_scales: dict[str, torch.Tensor] = attrs.field(factory=dict)
    lazy_group_params: bool = False
    keep_sparsity_mask: bool = True
    backend: str = "auto"
    calibration: LayerCalibration = attrs.field(init=False)
    activations: ActivationCalibration = attrs.field(factory=lambda: ActivationCalibration("GPTQModifier"))

    def __attrs_post_init__(self) -> None:
        self.calibration = LayerCalibration(
            input_statistic=HessianAccumulator.for_linear,
            output_statistic=output_energy_for,
            true_sequential=self.config.true_sequential,
        )

    @property
    def layouts(self) -> dict[tuple[str, tuple[str, ...]], list[list[str]]]:
        """The input groups found per layer kind (layer class, local module names)."""
        return self.calibration.layouts

    def llmc_initialize(self, context: RunContext) -> None:
        self.pending = self.config.plan(context)
        logger.info("GPTQModifier: %d Linear modules to quantize", len(self.pending))
        if any(scheme.weights.observer in ("mse", "memoryless_mse") for _, scheme in self.pending.values()):
            logger.warning(
                "GPTQModifier computes weight scales by min-max as its sweep reaches them; the "
                "weights' observer 'mse' applies to round-to-nearest (QuantizationModifier) only"
            )

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        prefix = f"{layer_name}."
        in_layer = {n: pair for n, pair in self.pending.items() if n.startswith(prefix)}
        wants_activations = self.activations.start(context, layer_name, layer, in_layer)
        modules = {n: module for n, (module, _) in in_layer.items()}
        return self.calibration.start(context, layer_name, layer, modules) or wants_activations

    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        self.activations.finish(context, layer_name)
        self.calibration.finish(context, layer_name, layer, self._solver(context))

    def llmc_finalize(self, context: RunContext) -> None:
        # Targets outside the calibrated blocks (a targeted lm_head) see no calibration data.
        for name in list(self.pending):
            global_scale = take_global_scale(self.global_scales, self.pending, name)
            module, scheme = self.pending.pop(name)
            logger.warning("%s lies outside the calibrated layers: quantized by round-to-nearest", name)
            self._round_to_nearest(context, name, module, scheme, global_scale)

    # --- helpers ---

    def _solver(self, context: RunContext) -> GroupSolver:
        return GroupSolver(
            compute=self._compute_group,
            apply=lambda group, solved: self._apply_group(context, group, solved),
            batch_key=self._batch_key,
            compute_batch=self._compute_batch,
            split=RowSplit(
                prepare=self._prepare_group, compute_rows=self._compute_rows, join=self._join_rows,
                can_split=self._can_split,
            ),
        )

    def _batch_key(self, group: InputGroup) -> tuple | None:
        """Groups with equal keys are solved as one batch (``_compute_batch``): the experts of an
        MoE block, whose modules have the same shapes and schemes, each with its own Hessian."""
        names = [name for name in group.names if name in self.pending]
        if group.statistic is None or not names:
            return None
        modules = [self.pending[name] for name in names]
        return tuple(
            (tuple(module.weight.shape), module.weight.dtype, str(module.weight.device), repr(scheme))
            for module, scheme in modules
        )

    def _compute_batch(self, groups: list[InputGroup]) -> list[dict[str, SolvedModule]]:
        """``_compute_group`` of groups of one ``_batch_key`` (or of one group): the groups'
        Hessians factored together (``_prepare_groups``), then per module position one batched
        sweep (``gptq_quantize_batch``); on CPU each group's results are exactly those of a
        batch of that group alone."""
        prepared = self._prepare_groups(groups)
        members = [[name for name in group.names if name in self.pending] for group in groups]
        solved: list[dict[str, SolvedModule]] = [{} for _ in groups]
        timed: set[bool] = set()  # the factorisation's time goes to the first position using it
        for position in range(len(members[0])):
            names = [group_members[position] for group_members in members]
            modules = [self.pending[name][0] for name in names]
            scheme = self.pending[names[0]][1]
            global_scales = [take_global_scale(self.global_scales, self.pending, name) for name in names]
            actorder = scheme.weights.actorder is not None
            factors = [one.hessians[actorder] for one in prepared]
            results = gptq_quantize_batch(
                [module.weight.detach() for module in modules],
                factors,
                args=scheme.weights,
                global_scales=global_scales,
                block_size=self.config.block_size,
                kept=[self._kept(module) for module in modules],
                lazy_group_params=self.lazy_group_params,
                scale_dtype=modules[0].weight.dtype,
                output_energies=[one.energies[name] for one, name in zip(prepared, names)],
                backend=self.backend,
                module_names=names,
            )
            for index, (name, result) in enumerate(zip(names, results)):
                seconds = 0.0 if actorder in timed else factors[index].seconds
                solved[index][name] = SolvedModule(result, prepared[index].tokens, seconds)
            timed.add(actorder)
        return solved

    def _prepare_groups(self, groups: list[InputGroup]) -> list[PreparedGroup]:
        """Everything the groups' Hessians give: per act-order one inverse Cholesky factor per
        group (``prepare_hessians``, factored together, shared by the group's modules) and each
        module's output energy. The Hessians are then freed, before any sweep: a 14336-wide
        one is 822 MB."""
        hessians = [group.statistic.finalize() for group in groups]
        members = [[name for name in group.names if name in self.pending] for group in groups]
        factors: list[dict[bool, PreparedHessian]] = [{} for _ in groups]
        energies: list[dict[str, float | None]] = [{} for _ in groups]
        for position in range(len(members[0])):
            names = [group_members[position] for group_members in members]
            actorder = self.pending[names[0]][1].weights.actorder is not None
            if actorder not in factors[0]:
                together = prepare_hessians(
                    hessians, dampening_frac=self.config.dampening_frac, actorder=actorder, module_names=names,
                )
                for own, one in zip(factors, together):
                    own[actorder] = one
            for own, group, name, H in zip(energies, groups, names, hessians):
                own[name] = _energy(group, name, self.pending[name][0], H)
        del hessians
        for group in groups:
            group.statistic.release()
        return [
            PreparedGroup(own_factors, own_energies, group.statistic.tokens)
            for own_factors, own_energies, group in zip(factors, energies, groups)
        ]

    def _compute_group(self, group: InputGroup) -> dict[str, SolvedModule]:
        """GPTQ of the group's pending modules from their shared Hessian (nothing installed:
        under torchrun another rank may apply the result); empty without a Hessian."""
        if group.statistic is None:
            return {}
        return self._compute_batch([group])[0]

    def _can_split(self, group: InputGroup) -> bool:
        names = [name for name in group.names if name in self.pending]
        return group.statistic is not None and bool(names) and all(
            self.pending[name][1].weights.strategy in _ROW_STRATEGIES
            and not self.pending[name][1].weights.has_global_scale
            for name in names
        )

    def _prepare_group(self, group: InputGroup) -> PreparedGroup:
        """The group's factorisation, once per act-order, and its modules' output energies."""
        return self._prepare_groups([group])[0]

    def _compute_rows(
        self, group: InputGroup, prepared: PreparedGroup, start: float, stop: float
    ) -> dict[str, GPTQResult]:
        """GPTQ of the rows between fractions ``start`` and ``stop`` of each module of the group:
        on CPU exactly those rows of the whole module's result (rows are swept independently)."""
        parts: dict[str, GPTQResult] = {}
        for name in [name for name in group.names if name in self.pending]:
            module, scheme = self.pending[name]
            first, last = row_bounds(module.weight.shape[0], start, stop)
            if last <= first:
                continue
            kept = self._kept(module)
            (parts[name],) = gptq_quantize_batch(
                [module.weight.detach()[first:last]],
                [prepared.hessians[scheme.weights.actorder is not None]],
                args=scheme.weights,
                block_size=self.config.block_size,
                kept=[None if kept is None else kept[first:last]],
                lazy_group_params=self.lazy_group_params,
                scale_dtype=module.weight.dtype,
                backend=self.backend,
                module_names=[name],
            )
        return parts

    def _join_rows(
        self, group: InputGroup, prepared: PreparedGroup, parts: list[dict[str, GPTQResult]]
    ) -> dict[str, SolvedModule]:
        """The modules' results from their rows' parts, in row order (``_compute_batch``'s)."""
        solved: dict[str, SolvedModule] = {}
        timed: set[bool] = set()  # the factorisation's time goes to the first module using it
        for name in [name for name in group.names if name in self.pending]:
            pieces = [part[name] for part in parts if name in part]
            actorder = self.pending[name][1].weights.actorder is not None
            hessian = prepared.hessians[actorder]
            error = sum(piece.hessian_error for piece in pieces)
            energy = prepared.energies[name]
            result = GPTQResult(
                weight=torch.cat([piece.weight for piece in pieces]),
                scale=torch.cat([piece.scale for piece in pieces]),
                zero_point=torch.cat([piece.zero_point for piece in pieces]),
                global_scale=None,
                damping=hessian.damping,
                hessian_error=error,
                output_error=error / energy if energy else None,
                seconds=sum(piece.seconds for piece in pieces),
                backend=pieces[0].backend,
            )
            solved[name] = SolvedModule(result, prepared.tokens, 0.0 if actorder in timed else hessian.seconds)
            timed.add(actorder)
        return solved

    def _kept(self, module: torch.nn.Linear) -> torch.Tensor | None:
        """The weights GPTQ must leave at zero: the pruning mask, unless told to refill them."""
        return sparsity_mask(module) if self.keep_sparsity_mask else None

    def _apply_group(self, context: RunContext, group: InputGroup, solved: dict[str, SolvedModule]) -> None:
        for name in group.names:
            if name not in self.pending:
                continue
            if name not in solved:
                global_scale = take_global_scale(self.global_scales, self.pending, name)
                module, scheme = self.pending.pop(name)
                logger.warning("%s received no calibration tokens: quantized by round-to-nearest", name)
                self._round_to_nearest(context, name, module, scheme, global_scale)
                continue
            module, scheme = self.pending.pop(name)
            self._install(context, name, module, scheme, solved[name])

    def _install(
        self,
        context: RunContext,
        name: str,
        module: torch.nn.Linear,
        scheme: QuantizationScheme,
        solved: SolvedModule,
    ) -> None:
        result = solved.result
        if not self.keep_sparsity_mask:
            clear_sparsity_mask_(module)
        original = module.weight.detach().clone()
        set_quantized_weight_(
            module, scheme, weight_fake_quantized=result.weight, scale=result.scale,
            zero_point=result.zero_point, global_scale=result.global_scale,
        )
        inputs = self.activations.install_input_scale(name, module, scheme)
        context.record(
            modifier="GPTQModifier",
            module=name,
            scheme=describe_scheme(scheme),
            weight_error=relative_error(original, module.weight.detach()),
            output_error=result.output_error,
            damping=result.damping,
            tokens=solved.tokens,
            seconds=round(result.seconds + solved.hessian_seconds, 4),
            backend=result.backend,
            **inputs,
        )

    def _round_to_nearest(
        self,
        context: RunContext,
        name: str,
        module: torch.nn.Linear,
        scheme: QuantizationScheme,
        global_scale: torch.Tensor | None,
    ) -> None:
        started = time.perf_counter()
        original = module.weight.detach().clone()
        quantize_linear_(module, scheme, global_scale=global_scale)
        inputs = self.activations.install_input_scale(name, module, scheme)
        context.record(
            modifier="GPTQModifier",
            module=name,
            scheme=describe_scheme(scheme),
            weight_error=relative_error(original, module.weight.detach()),
            method="round-to-nearest",
            seconds=round(time.perf_counter() - started, 4),
            **inputs,
        )
