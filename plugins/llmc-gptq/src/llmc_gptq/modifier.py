"""``GPTQModifier``: the recipe parameters, and the run state that calibrates and quantizes.

The configuration is a frozen attrs class whose fields are exactly the parameters a recipe
gives (``targets``, ``ignore``, ``scheme`` or ``config_groups``, ``block_size``,
``dampening_frac``, ``actorder``, ``true_sequential``); everything that changes during a run
(Hessians, the modules still to quantize, the layout of modules inside a layer) lives in
``GPTQRun``, which implements the lifecycle hooks of ``llmc.hookspecs``. Per decoder layer::

    llmc_layer_start   hooks on the layer's target Linears: H = 2/N Σ xxᵀ of their input
                       (fp32, on the layer's device) and 2/N Σ ‖Wx‖² of their output
    calibration pass   (core) every batch through the layer, cut short once the last target
                       Linear has its input, unless another modifier has hooks on the layer
    llmc_layer_end     solve the modules (llmc_gptq.gptq) and install the results
                       (llmc.quantization.set_quantized_weight_);
                       true_sequential: for each further stage, re-run the layer as it now is
                       (context.forward_layer), with hooks on that stage only and each batch cut
                       short once the stage has run (StopLayerForward), then solve it

Modules are grouped by data flow, not by name: during the first batch through a layer, target
Linears that receive the very same input tensor form a group (q/k/v read the normed hidden
states, gate/up the post-attention ones), ordered by when they run. A group shares one Hessian
and one inverse Cholesky factor. With ``true_sequential`` each group is a stage; a layer with
more than ``MAX_STAGES`` groups (a mixture of experts: one group per expert) is done in two
stages, the first group and then all others. The layout found for one layer is reused by the
layers with the same class and module names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import ArgumentError, CalibrationError, RecipeError
from llmc.hessian import HessianAccumulator
from llmc.hookspecs import hookimpl
from llmc.masks import sparsity_mask
from llmc.modifier import Modifier
from llmc.modifiers.quantization import (
    describe_scheme,
    plan_quantization,
    relative_error,
    resolve_schemes,
)
from llmc.pipeline import StopLayerForward
from llmc.quantization import QuantizationScheme, quantize_linear_, set_quantized_weight_
from llmc_gptq.gptq import (
    PreparedHessian,
    gptq_quantize_prepared,
    prepare_hessian,
    reference_energy,
)

__all__ = ["ACTORDERS", "MAX_STAGES", "GPTQModifier", "GPTQRun"]

logger = logging.getLogger("llmc.gptq")

ACTORDERS = (None, "weight", "static")
MAX_STAGES = 8
_NO_ACTORDER = ("none", "false")


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _canonical_actorder(value: Any) -> Any:
    if value is False or (isinstance(value, str) and value.lower() in _NO_ACTORDER):
        return None
    return value.lower() if isinstance(value, str) else value


def _check_actorder(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value in ("group", "dynamic"):
        raise ArgumentError(
            f"'actorder' {value!r} is not supported: it needs a g_idx tensor that "
            "compressed-tensors 0.20 no longer loads; use actorder 'weight' (or its alias "
            "'static'): same accuracy gain, no runtime cost",
            name="actorder",
        )
    if value not in ACTORDERS:
        raise ArgumentError(
            f"'actorder' must be one of null, 'weight', 'static' (got {value!r})", name="actorder"
        )


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(
            f"'{attribute.name}' must be a positive integer (got {value!r})", name=attribute.name
        )


def _damping(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ArgumentError(
            f"'dampening_frac' must be a number between 0 and 1, e.g. 0.01 (got {value!r})",
            name="dampening_frac",
        )


def _scheme_form(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return
    raise RecipeError(
        "'scheme' must be a preset name such as 'W4A16' or a mapping {preset: [targets]} "
        f"(got {value!r})"
    )


@attrs.frozen(kw_only=True)
class GPTQModifier(Modifier):
    """GPTQ weight quantization (arXiv 2210.17323): per Linear, round columns one at a time and
    let the remaining columns compensate, using second-order statistics of the layer's inputs.

    ``scheme`` (``W4A16``, ``W4A16_ASYM``, ``W8A16``, ``W8A8``, or ``{preset: [targets]}``)
    or ``config_groups`` say what to quantize; ``targets``/``ignore`` take class names, module
    names and ``re:`` patterns. ``block_size`` columns are updated lazily at a time;
    ``dampening_frac`` of the mean Hessian diagonal is added to it (raised step by step when
    the Hessian is still not positive definite). ``actorder`` ``weight`` (alias ``static``)
    quantizes columns by decreasing input energy while keeping the groups by column index, so
    the checkpoint needs no ``g_idx``; ``null`` keeps column order. ``true_sequential``
    quantizes the groups of a layer in data-flow order (q/k/v, o, gate/up, down), re-running
    the layer in between so each group is calibrated on the outputs of the already-quantized
    ones.
    """

    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=_as_list)
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=_as_list)
    scheme: Any = attrs.field(default=None, validator=_scheme_form)
    config_groups: dict[str, Any] | None = None
    block_size: int = attrs.field(default=128, validator=_positive_int)
    dampening_frac: float = attrs.field(default=0.01, validator=_damping)
    actorder: str | None = attrs.field(
        default="static", converter=_canonical_actorder, validator=_check_actorder
    )
    true_sequential: bool = False
    skip_incompatible: bool = False

    def __attrs_post_init__(self) -> None:
        # Validates the schemes now, so a bad recipe fails before any model is loaded.
        self.schemes()

    def schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies (first match wins), with ``actorder`` resolved.

        The modifier's ``actorder`` fills in schemes that do not set one; a scheme from
        ``config_groups`` that sets its own keeps it (the only value left, ``weight``).
        """
        wanted = "weight" if self.actorder == "static" else self.actorder
        resolved = []
        for scheme in resolve_schemes(self.scheme, self.config_groups, self.targets):
            weights = scheme.weights
            if weights.actorder is None and wanted is not None:
                scheme = attrs.evolve(scheme, weights=attrs.evolve(weights, actorder=wanted))
            resolved.append(scheme)
        return resolved

    def start(self, context: RunContext) -> GPTQRun:
        return GPTQRun(config=self, schemes=self.schemes())


# --- collecting statistics during a calibration pass ------------------------------------------


# Below this input width ``trace(W H Wᵀ)`` costs less as a product at solve time (rows · cols²)
# than as a pass over the Linear's outputs during calibration (tokens · rows).
ENERGY_FROM_OUTPUTS_MIN_COLS = 1024


@attrs.define
class _OutputEnergy:
    """Running 2/N Σ ‖W x‖² over the calibration tokens: ``trace(W H Wᵀ)``, the reference
    the relative output error is measured against, read from the Linear's outputs (for wide
    inputs, where the product at solve time would cost more)."""

    total: torch.Tensor
    tokens: int = 0

    def add_(self, output: torch.Tensor, bias: torch.Tensor | None, token_mask: torch.Tensor | None) -> None:
        y = output.detach()
        if bias is not None:
            y = y - bias
        y = y.reshape(-1, y.shape[-1])  # [tokens, out]
        if token_mask is not None and token_mask.numel() == y.shape[0] and not bool(token_mask.all()):
            y = y[token_mask.reshape(-1).to(device=y.device, dtype=torch.bool)]
        # one fused reduction, no float64 copy of the output
        self.total += torch.linalg.vector_norm(y, dtype=torch.float32).double().square()
        self.tokens += y.shape[0]

    @property
    def value(self) -> float | None:
        return 2.0 * self.total.item() / self.tokens if self.tokens else None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class _PassCollector:
    """Hooks for one calibration pass over a layer: Hessians of the groups being calibrated.

    A *group* is the set of target Linears that read the same input tensor; they share one
    Hessian (q/k/v: one product instead of three). ``layout`` lists the groups in the order
    they run; when it is None it is found on the first batch (modules whose input is the very
    tensor an earlier module received join its group) and is ``layout`` afterwards.
    ``collect`` holds the indices of the groups whose Hessians (and output energies) are
    accumulated, None for all.

    Once every module of the collected groups has received its input, the rest of the batch's
    forward is of no use to GPTQ and is cut short (``StopLayerForward``; before the last
    module's own product when its reference energy comes from ``H``). ``stop`` "always" is for
    GPTQ's own re-runs; "if-alone", for core's calibration pass, stops only when no hook but
    these is registered on the layer or any of its modules (another modifier may need the rest
    of the layer), and "never" keeps every batch whole.
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        modules: dict[str, torch.nn.Linear],
        context: RunContext,
        layout: list[list[str]] | None,
        collect: set[int] | None,
        stop: str,
    ) -> None:
        self.modules = modules
        self.context = context
        self.layout = [list(group) for group in layout] if layout is not None else None
        self.discovering = layout is None
        self.collect = collect
        self.stop = stop
        self.hessians: dict[int, HessianAccumulator] = {}
        self.energies: dict[str, _OutputEnergy] = {}
        self.group_of: dict[str, int] = {}
        self._inputs: list[torch.Tensor] = []  # first batch while discovering; held, so no reuse
        self._seen: set[str] = set()  # collected modules whose input this batch has reached
        self._fired: set[str] = set()  # ... and whose output
        self._alone: bool | None = None
        self.layer = layer
        self._batches = 0
        self._collected: int | None = None  # modules in the collected groups, once known
        if self.layout is not None:
            self.group_of = {name: index for index, group in enumerate(self.layout) for name in group}
        self._handles = [layer.register_forward_pre_hook(self._new_batch)]
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._before(name)))
            self._handles.append(module.register_forward_hook(self._after(name)))

    def remove(self) -> list[list[str]]:
        """Remove the hooks; return the layout (modules that never ran form a last group)."""
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()
        layout = self.layout if self.layout is not None else []
        unseen = [name for name in self.modules if name not in self.group_of]
        if unseen:
            layout.append(unseen)
        return layout

    def _collected_count(self) -> int:
        if self._collected is None:
            assert self.layout is not None
            self._collected = sum(len(g) for i, g in enumerate(self.layout) if self._collects(i))
        return self._collected

    def _collects(self, index: int) -> bool:
        return self.collect is None or index in self.collect

    def _may_stop(self) -> bool:
        if self.stop == "always":
            return True
        if self.stop != "if-alone":
            return False
        if self._alone is None:
            ours = {handle.id for handle in self._handles}
            hooks = [
                key
                for module in self.layer.modules()
                for table in (module._forward_pre_hooks, module._forward_hooks)
                for key in table
            ]
            global_hooks = torch.nn.modules.module._global_forward_hooks
            global_pre_hooks = torch.nn.modules.module._global_forward_pre_hooks
            self._alone = set(hooks) <= ours and not global_hooks and not global_pre_hooks
        return self._alone

    def _new_batch(self, *_: Any) -> None:
        self._batches += 1
        self._seen.clear()
        self._fired.clear()
        if self.discovering and self._batches == 2:
            self.discovering = False
            self._inputs.clear()

    def _group(self, name: str, x: torch.Tensor) -> tuple[int, bool]:
        """``(group index, whether this module leads its group)`` for an input ``x``."""
        if self.discovering and self._batches == 1 and name not in self.group_of:
            if self.layout is None:
                self.layout = []
            for index, held in enumerate(self._inputs):
                if _same_tensor(x, held):
                    self.layout[index].append(name)
                    self.group_of[name] = index
                    return index, False
            self._inputs.append(x)
            self.layout.append([name])
            self.group_of[name] = len(self.layout) - 1
            return len(self.layout) - 1, True
        index = self.group_of.get(name, -1)
        return index, index >= 0 and self.layout[index][0] == name

    def _before(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if not args:
                return
            index, leads = self._group(name, args[0])
            if not self._collects(index):
                return
            if leads:
                if index not in self.hessians:
                    self.hessians[index] = HessianAccumulator.for_linear(module)
                self.hessians[index].add_(args[0].detach(), self.context.attention_mask)
            self._seen.add(name)
            if (
                not self.discovering
                and len(self._seen) == self._collected_count()
                and module.in_features < ENERGY_FROM_OUTPUTS_MIN_COLS  # its output is not needed
                and self._may_stop()
            ):
                raise StopLayerForward

        return hook

    def _after(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            index = self.group_of.get(name, -1)
            if index < 0 or not self._collects(index):
                return
            if module.in_features >= ENERGY_FROM_OUTPUTS_MIN_COLS:
                if name not in self.energies:
                    self.energies[name] = _OutputEnergy(
                        torch.zeros((), dtype=torch.float64, device=module.weight.device)
                    )
                self.energies[name].add_(output, module.bias, self.context.attention_mask)
            self._fired.add(name)
            if not self.discovering and len(self._fired) == self._collected_count() and self._may_stop():
                raise StopLayerForward

        return hook


# --- the run state ------------------------------------------------------------------------------


@attrs.define
class GPTQRun:
    """Run state of a ``GPTQModifier``: pending modules, layer layouts, the current pass's hooks.

    ``lazy_group_params`` (True) computes a group's scale when the sweep reaches it, from the
    error-updated weights; False fixes the scales up front from the original weights, as
    llm-compressor does (kept for comparisons, see docs/benchmarks.md).
    ``backend`` picks the sweep: "auto" (numba on CPU, torch on GPU), "numba" or "torch".
    """

    config: GPTQModifier
    schemes: list[QuantizationScheme]
    pending: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)
    lazy_group_params: bool = True
    backend: str = "auto"
    # layer class and local module names -> groups of local names, in the order they run
    layouts: dict[tuple[str, tuple[str, ...]], list[list[str]]] = attrs.field(factory=dict)
    collector: _PassCollector | None = None
    layer_modules: dict[str, torch.nn.Linear] = attrs.field(factory=dict)
    layout_key: tuple[str, tuple[str, ...]] | None = None

    @hookimpl
    def llmc_initialize(self, context: RunContext) -> None:
        self.pending = plan_quantization(
            context.model,
            self.schemes,
            modifier="GPTQModifier",
            targets=self.config.targets,
            ignore=self.config.ignore,
            skip_incompatible=self.config.skip_incompatible,
        )
        logger.info("GPTQModifier: %d Linear modules to quantize", len(self.pending))

    @hookimpl
    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        prefix = f"{layer_name}."
        modules = {n: m for n, (m, _) in self.pending.items() if n.startswith(prefix)}
        if not modules:
            return False
        self.layer_modules = modules
        self.layout_key = (type(layer).__qualname__, tuple(n.removeprefix(prefix) for n in modules))
        known = self.layouts.get(self.layout_key)
        layout = None if known is None else [[prefix + local for local in group] for group in known]
        # The calibration pass is core's: its batches stop early only when no other hook is on
        # the layer. With true_sequential only the first group is calibrated in it.
        collect = {0} if self.config.true_sequential else None
        self.collector = _PassCollector(layer, modules, context, layout, collect, stop="if-alone")
        return True

    @hookimpl
    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        if self.collector is None:
            return
        prefix = f"{layer_name}."
        collector, self.collector = self.collector, None
        layout = collector.remove()
        assert self.layout_key is not None
        self.layouts[self.layout_key] = [[n.removeprefix(prefix) for n in group] for group in layout]
        stages = self._stages(layout, layer_name)
        self._solve_groups(context, collector, layout, stages[0])
        for stage in stages[1:]:
            if context.forward_layer is None:
                raise CalibrationError(
                    f"true_sequential needs to re-run {layer_name}, but the pipeline offers no "
                    "context.forward_layer; set true_sequential: false",
                    module=layer_name,
                )
            collector = _PassCollector(layer, self.layer_modules, context, layout, stage, stop="always")
            try:
                context.forward_layer()
            finally:
                collector.remove()
            self._solve_groups(context, collector, layout, stage)
        self.layer_modules = {}

    @hookimpl
    def llmc_finalize(self, context: RunContext) -> None:
        # Targets outside the calibrated blocks (a targeted lm_head) see no calibration data.
        for name in list(self.pending):
            module, scheme = self.pending.pop(name)
            logger.warning("%s lies outside the calibrated layers: quantized by round-to-nearest", name)
            self._round_to_nearest(context, name, module, scheme)

    # --- helpers ---

    def _stages(self, layout: list[list[str]], layer_name: str) -> list[set[int]]:
        """Which groups are solved together, in order: one stage, or one per group."""
        if not self.config.true_sequential:
            return [set(range(len(layout)))]
        if len(layout) > MAX_STAGES:
            logger.info(
                "%s has %d input groups (mixture of experts?): true_sequential solves the first "
                "group, then all the others from one more pass",
                layer_name, len(layout),
            )
            return [{0}, set(range(1, len(layout)))]
        return [{index} for index in range(len(layout))]

    def _solve_groups(
        self, context: RunContext, collector: _PassCollector, layout: list[list[str]], stage: set[int]
    ) -> None:
        for index in sorted(stage):
            accumulator = collector.hessians.pop(index, None)
            H = accumulator.H if accumulator is not None and accumulator.tokens else None
            prepared: dict[bool, PreparedHessian] = {}  # shared by the group, per act-order
            for name in layout[index]:
                if name not in self.pending:
                    continue
                module, scheme = self.pending.pop(name)
                energy = collector.energies.pop(name, None)
                if H is None:
                    logger.warning("%s received no calibration tokens: quantized by round-to-nearest", name)
                    self._round_to_nearest(context, name, module, scheme)
                    continue
                actorder = scheme.weights.actorder is not None
                seconds = 0.0
                if actorder not in prepared:
                    prepared[actorder] = prepare_hessian(
                        H, dampening_frac=self.config.dampening_frac, actorder=actorder,
                        module_name=name,
                    )
                    seconds = prepared[actorder].seconds
                if energy is not None:
                    reference = energy.value
                else:  # narrow input: trace(W H Wᵀ) as one small product
                    reference = reference_energy(module.weight.detach(), H, kept=sparsity_mask(module))
                self._solve(context, name, module, scheme, prepared[actorder], accumulator.tokens, reference, seconds)

    def _solve(
        self,
        context: RunContext,
        name: str,
        module: torch.nn.Linear,
        scheme: QuantizationScheme,
        prepared: PreparedHessian,
        tokens: int,
        energy: float | None,
        hessian_seconds: float,
    ) -> None:
        weights = scheme.weights
        original = module.weight.detach().clone()
        result = gptq_quantize_prepared(
            module.weight.detach(),
            prepared,
            num_bits=weights.num_bits,
            symmetric=weights.symmetric,
            strategy=weights.strategy,
            group_size=weights.group_size,
            block_size=self.config.block_size,
            kept=sparsity_mask(module),
            lazy_group_params=self.lazy_group_params,
            scale_dtype=module.weight.dtype,
            output_energy=energy,
            backend=self.backend,
            module_name=name,
        )
        set_quantized_weight_(
            module, scheme, weight_fake_quantized=result.weight, scale=result.scale, zero_point=result.zero_point
        )
        context.record(
            modifier="GPTQModifier",
            module=name,
            scheme=describe_scheme(scheme),
            weight_error=relative_error(original, module.weight.detach()),
            output_error=result.output_error,
            damping=result.damping,
            tokens=tokens,
            seconds=round(result.seconds + hessian_seconds, 4),
            backend=result.backend,
        )

    def _round_to_nearest(
        self, context: RunContext, name: str, module: torch.nn.Linear, scheme: QuantizationScheme
    ) -> None:
        started = time.perf_counter()
        original = module.weight.detach().clone()
        quantize_linear_(module, scheme)
        context.record(
            modifier="GPTQModifier",
            module=name,
            scheme=describe_scheme(scheme),
            weight_error=relative_error(original, module.weight.detach()),
            method="round-to-nearest",
            seconds=round(time.perf_counter() - started, 4),
        )
