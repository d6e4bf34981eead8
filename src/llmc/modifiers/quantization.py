"""Round-to-nearest weight quantization, with dynamic or static activation quantization.

The baseline every smarter quantizer (GPTQ) is measured against, and the quickest way to a
checkpoint vLLM serves. Data-free unless a scale must be observed on activations: static input
activations (the ``FP8`` preset) or a ``kv_cache_scheme`` calibrate layer by layer
(``llmc.calibration``), and then a dataset is required.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from llmc.calibration import ActivationCalibration, needs_calibration_data
from llmc.context import RunContext
from llmc.errors import CalibrationError, RecipeError
from llmc.modifier import RunState, TargetedModifier
from llmc.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
    quantize_linear_,
    schemes_from_config_groups,
    start_qat_,
    stop_qat_,
    take_global_scale,
)
from llmc.quantization.module import has_static_inputs
from llmc.quantization.scheme import kv_cache_args_from_config_dict
from llmc.report import relative_error
from llmc.targets import match_modules
from llmc.validators import is_bool

__all__ = [
    "QuantizationModifier",
    "QuantizationRun",
    "QuantizingModifier",
    "describe_scheme",
    "plan_quantization",
    "resolve_schemes",
    "round_to_nearest_and_record",
    "target_linears",
]

logger = logging.getLogger("llmc.quantization")


def _scheme_form(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return
    raise RecipeError(
        "'scheme' must be a preset name such as 'W4A16' or a mapping {preset: [targets]} "
        f"(got {value!r})"
    )


def resolve_schemes(
    scheme: str | dict[str, Any] | None,
    config_groups: dict[str, dict[str, Any]] | None,
    targets: list[str],
) -> list[QuantizationScheme]:
    """The schemes a quantizing modifier applies, first match wins, from either form it accepts.

    ``scheme: W4A16`` applies a preset to ``targets``; ``scheme: {W4A16: [...], W8A16: [...]}``
    gives each preset its own targets; ``config_groups`` is the explicit compressed-tensors form.
    """
    if (scheme is None) == (config_groups is None):
        raise RecipeError("give exactly one of 'scheme' and 'config_groups'")
    if isinstance(scheme, str):
        return [preset_scheme(scheme, targets)]
    if isinstance(scheme, dict):
        return [preset_scheme(name, [group] if isinstance(group, str) else list(group)) for name, group in scheme.items()]
    assert config_groups is not None
    return list(schemes_from_config_groups(config_groups).values())


def target_linears(
    root: torch.nn.Module,
    schemes: list[QuantizationScheme],
    ignore: list[str],
    prefix: str = "",
) -> list[tuple[str, torch.nn.Linear, QuantizationScheme]]:
    """Each Linear under ``root`` that a scheme targets, with the first scheme that does."""
    found: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = {}
    for scheme in schemes:
        for name, module in match_modules(root, scheme.targets, ignore, prefix=prefix):
            if isinstance(module, torch.nn.Linear) and name not in found:
                found[name] = (module, scheme)
    return [(name, module, scheme) for name, (module, scheme) in found.items()]


def incompatible_group_size(module: torch.nn.Linear, scheme: QuantizationScheme) -> int | None:
    """The group size (of the weights or of the input activations, both grouped along the
    input width) that does not divide this module's input width, if any."""
    for args in (scheme.weights, scheme.input_activations):
        if args is None or args.strategy not in ("group", "tensor_group") or not args.group_size:
            continue
        if module.in_features % args.group_size:
            return args.group_size
    return None


def plan_quantization(
    model: torch.nn.Module,
    schemes: list[QuantizationScheme],
    *,
    modifier: str,
    targets: list[str],
    ignore: list[str],
    skip_incompatible: bool,
) -> dict[str, tuple[torch.nn.Linear, QuantizationScheme]]:
    """The Linears a quantizing modifier (RTN, GPTQ) will quantize, each with its scheme.

    Checked before any work, so a bad recipe fails in seconds rather than after calibration: a
    group size that does not divide a module's input width stops the run with the fixes, or
    with ``skip_incompatible`` leaves the module unquantized (the checkpoint lists it in
    ``ignore``). ``modifier`` and ``targets`` only name the run in the error when nothing matches.
    """
    plan: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = {}
    for name, module, scheme in target_linears(model, schemes, ignore):
        group_size = incompatible_group_size(module, scheme)
        if group_size is not None:
            if skip_incompatible:
                logger.warning(
                    "leaving %s unquantized: group size %d does not divide its input width %d",
                    name, group_size, module.in_features,
                )
                continue
            raise CalibrationError(
                f"group size {group_size} does not divide the input width "
                f"{module.in_features} of {name}; choose a group size that divides it, "
                "ignore the module, or set skip_incompatible: true",
                module=name,
            )
        plan[name] = (module, scheme)
    if not plan:
        raise CalibrationError(
            f"{modifier} targets {targets} (ignoring {ignore}) match no Linear module of this model"
        )
    return plan


@attrs.frozen(kw_only=True)
class QuantizingModifier(TargetedModifier):
    """Base of the modifiers that quantize Linear weights (round-to-nearest, GPTQ, ...).

    ``scheme`` (a preset name such as ``W4A16``, or ``{preset: [targets]}``) or
    ``config_groups`` (compressed-tensors' explicit form) say what to quantize, checked when
    the modifier is built so a bad recipe fails before any model is loaded. With
    ``skip_incompatible`` a module whose input width the group size does not divide is left
    unquantized (and listed in the checkpoint's ``ignore``) instead of stopping the run.
    ``kv_cache_scheme`` (llm-compressor's field, e.g. ``{num_bits: 8, type: float, strategy:
    tensor, dynamic: false, symmetric: true}``) also calibrates ``k_scale``/``v_scale`` on every
    attention module of the calibrated layers.
    """

    scheme: Any = attrs.field(default=None, validator=_scheme_form)
    config_groups: dict[str, dict[str, Any]] | None = None
    skip_incompatible: bool = attrs.field(default=False, validator=is_bool)
    kv_cache_scheme: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        self.schemes()
        self.kv_cache_args()

    def kv_cache_args(self) -> QuantizationArgs | None:
        """The KV-cache arguments, None when the KV cache is left alone."""
        return kv_cache_args_from_config_dict(self.kv_cache_scheme)

    def activation_calibration(self) -> ActivationCalibration:
        """The run's calibration of static input and KV-cache scales (``llmc.calibration``)."""
        return ActivationCalibration(modifier=self.recipe_name(), kv_cache=self.kv_cache_args())

    def schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies, first match wins."""
        return resolve_schemes(self.scheme, self.config_groups, self.targets)

    def plan(self, context: RunContext) -> dict[str, tuple[torch.nn.Linear, QuantizationScheme]]:
        """The Linears this modifier quantizes, each with its scheme (see ``plan_quantization``)."""
        return plan_quantization(
            context.model,
            self.schemes(),
            modifier=self.recipe_name(),
            targets=self.targets,
            ignore=self.ignore,
            skip_incompatible=self.skip_incompatible,
        )


@attrs.frozen(kw_only=True)
class QuantizationModifier(QuantizingModifier):
    """Round-to-nearest quantization of Linear weights with min-max scales.

    ``targets``/``ignore`` take class names, module names and ``re:`` patterns. With
    ``skip_incompatible=True`` a module whose input width the group size does not divide is
    left unquantized (and listed in the checkpoint's ``ignore``) instead of stopping the run.

    In a training stage this is quantization-aware training: every optimizer step computes with
    the fake-quantized weights and passes gradients straight through to the float weights
    (``llmc.quantization.qat``); when training ends the trained weights are quantized, so the
    checkpoint computes what the last training step computed.
    """

    supports_training = True

    @property
    def requires_calibration_data(self) -> bool:  # type: ignore[override]
        """Only static activation scales need data; weights' scales come from the weights."""
        return needs_calibration_data(self.schemes(), self.kv_cache_args())

    @property
    def calibration_data_reason(self) -> str:
        """Why this modifier needs data, for the error when none is given."""
        return "static activation scales (static input_activations or kv_cache_scheme) are observed on it"

    def start(self, context: RunContext) -> QuantizationRun:
        return QuantizationRun(
            config=self, schemes=self.schemes(), activations=self.activation_calibration()
        )


@attrs.define
class QuantizationRun(RunState):
    """Run state of a QuantizationModifier: which modules it will quantize and has quantized."""

    config: QuantizationModifier
    schemes: list[QuantizationScheme]
    pending: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)
    # NVFP4 global scales of modules whose fused sibling (q/k/v, gate/up) was quantized first
    global_scales: dict[str, torch.Tensor] = attrs.field(factory=dict)
    activations: ActivationCalibration = attrs.field(factory=lambda: ActivationCalibration("QuantizationModifier"))

    def llmc_initialize(self, context: RunContext) -> None:
        self.pending = self.config.plan(context)
        logger.info("QuantizationModifier: %d Linear modules to quantize", len(self.pending))

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        prefix = f"{layer_name}."
        in_layer = {n: pair for n, pair in self.pending.items() if n.startswith(prefix)}
        return self.activations.start(context, layer_name, layer, in_layer)

    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        self.activations.finish(context, layer_name)
        prefix = f"{layer_name}."
        for name in [n for n in self.pending if n.startswith(prefix)]:
            self._quantize(context, name)

    def llmc_finalize(self, context: RunContext) -> None:
        for name in list(self.pending):
            self._quantize(context, name)

    # --- training stage: quantization-aware training, quantized when it ends ------------------

    def llmc_train_start(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        if self.activations.kv_cache is not None or any(has_static_inputs(s) for _, s in self.pending.values()):
            raise RecipeError(
                "QuantizationModifier in a training stage supports weights and dynamic inputs "
                "only; static input activations and kv_cache_scheme need a oneshot stage"
            )
        for module, scheme in self.pending.values():
            start_qat_(module, scheme)
        logger.info("QuantizationModifier: quantization-aware training of %d Linear modules", len(self.pending))

    def llmc_train_end(self, context: RunContext) -> None:
        for module, _ in self.pending.values():
            stop_qat_(module)

    def _quantize(self, context: RunContext, name: str) -> None:
        global_scale = take_global_scale(self.global_scales, self.pending, name)
        module, scheme = self.pending.pop(name)
        stop_qat_(module)
        round_to_nearest_and_record(
            context, "QuantizationModifier", name, module, scheme,
            global_scale=global_scale, activations=self.activations,
        )


def round_to_nearest_and_record(
    context: RunContext,
    modifier: str,
    name: str,
    module: torch.nn.Linear,
    scheme: QuantizationScheme,
    *,
    global_scale: torch.Tensor | None = None,
    activations: ActivationCalibration | None = None,
) -> None:
    """Quantize ``module`` by round-to-nearest and add its report row (scheme, weight error,
    and its observed input scale when ``activations`` calibrated one): the last step of every
    modifier whose quantization is plain rounding. ``global_scale`` is NVFP4's, shared with the
    module's fused siblings (``take_global_scale``)."""
    original = module.weight.detach().clone()
    quantize_linear_(module, scheme, global_scale=global_scale)
    extra = activations.install_input_scale(name, module, scheme) if activations is not None else {}
    context.record(
        modifier=modifier,
        module=name,
        scheme=describe_scheme(scheme),
        weight_error=relative_error(original, module.weight.detach()),
        **extra,
    )


def describe_scheme(scheme: QuantizationScheme) -> str:
    """A short label such as 'w:int4 group128 sym' or 'w:fp8 channel sym, a:fp8 token' for reports."""

    def kind(args: Any) -> str:
        if args.type == "int":
            return f"int{args.num_bits}"
        prefix = "mx" if args.is_mx else "nv" if args.has_global_scale else ""
        return f"{prefix}fp{args.num_bits}"

    parts = []
    if scheme.weights is not None:
        w = scheme.weights
        if w.strategy in ("group", "tensor_group"):
            strategy = f"group{w.group_size}"
        elif w.strategy == "block":
            strategy = "block{}x{}".format(*w.block_structure)
        else:
            strategy = w.strategy
        parts.append(f"w:{kind(w)} {strategy} {'sym' if w.symmetric else 'asym'}")
    inputs = scheme.input_activations
    if inputs is not None:
        parts.append(f"a:{kind(inputs)} {inputs.strategy}" + ("" if inputs.dynamic else " static"))
    return ", ".join(parts)
