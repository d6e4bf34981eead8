"""The in-memory form of a quantized Linear, shared by every algorithm and by the saver.

A quantized ``nn.Linear`` stays an ``nn.Linear`` whose ``weight`` holds the fake-quantized
values (``(q - zero_point) * scale``, in the weight's own dtype), plus buffers
``weight_scale`` and ``weight_zero_point`` (int8, zeros when symmetric; float8_e4m3fn zeros
for FP8) and an attribute ``quantization_scheme``. Its forward is therefore exactly the forward
transformers runs after loading the saved checkpoint (which dequantizes to the same values), so
evaluation, the next layer's calibration inputs and the checkpoint all agree. Dynamic input
quantization (W8A8's int8, FP8_DYNAMIC's FP8, per token) is a forward pre-hook doing what
compressed-tensors does in its quantized forward. Static input quantization (the ``FP8``
preset) is the same pre-hook with the scale an observer fixed at calibration, held in the
buffers ``input_scale`` (and ``input_zero_point``) under the checkpoint's names; until that
scale is set (during calibration) the input passes unchanged, as in llm-compressor, whose
observers see the unquantized inputs.

Keeping the float weight rather than the codes means solvers (GPTQ, ...) write their result
once and everything downstream, including ``weight_codes``, recovers the codes exactly.

The float formats keep the same layout: ``weight_scale`` holds the scale's value in the weight's
dtype (an FP8 value for NVFP4, a power of two for MX; the writers store it as FP8 or as an E8M0
byte), and NVFP4 adds ``weight_global_scale`` (float32 ``[1]``), the weight being
``codes * weight_scale / weight_global_scale``. NVFP4 input activations (``dynamic: local``)
read a static ``input_global_scale`` buffer, which comes from calibration.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from llmc.errors import ArgumentError, CalibrationError
from llmc.quantization.grids import grid_of
from llmc.quantization.math import (
    ZERO_POINT_DTYPE,
    compute_qparams,
    dequantize,
    dynamic_activation_fake_quantize,
    effective_scale,
    global_scale_from_range,
    qparam_shape,
    quantize,
    recover_codes,
    static_activation_fake_quantize,
)
from llmc.quantization.observers import observe_weight
from llmc.quantization.scheme import QuantizationScheme
from llmc.torch_hooks import has_forward_pre_hook, remove_forward_pre_hooks

__all__ = [
    "input_global_scale_from_range",
    "set_input_global_scale_",
    "is_quantized",
    "quantize_linear_",
    "has_static_inputs",
    "quantized_linears",
    "set_input_qparams_",
    "set_quantized_weight_",
    "weight_codes",
]


def _check_linear(module: Any, scheme: Any) -> None:
    if not isinstance(module, nn.Linear):
        raise ArgumentError(
            f"only nn.Linear modules can be quantized (got {type(module).__name__})",
            name="module",
        )
    if not isinstance(scheme, QuantizationScheme):
        raise ArgumentError(
            f"'scheme' must be a llmc QuantizationScheme (got {type(scheme).__name__}); "
            f"use preset_scheme() or scheme_from_config_dict()",
            name="scheme",
        )


def _shape(t: torch.Tensor | torch.Size | tuple) -> str:
    return "[" + ", ".join(str(d) for d in (t.shape if isinstance(t, torch.Tensor) else t)) + "]"


def _checked_qparams(
    module: nn.Linear,
    scheme: QuantizationScheme,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` in the weight's dtype and a ``zero_point`` (int8, or float8_e4m3fn zeros for FP8),
    both checked against the weight.

    The checkpoint stores the scale in the weight's dtype (compressed-tensors creates the
    parameter that way), so the in-memory weight must be built from that same scale.
    """
    args = scheme.weights
    weight = module.weight
    expected = qparam_shape(weight.shape, args)
    if tuple(scale.shape) != expected:
        raise CalibrationError(
            f"scale has shape {_shape(scale)}, expected {_shape(expected)} for a weight of "
            f"shape {_shape(weight)} with strategy {args.strategy!r}"
        )
    if not scale.dtype.is_floating_point:
        raise CalibrationError(f"scale must be a float tensor (got dtype {scale.dtype})")
    grid = grid_of(args)
    if grid.is_float:  # symmetric only: the zero point is all zeros
        if zero_point is not None and bool(zero_point.to(torch.float32).ne(0).any()):
            raise CalibrationError(
                "an FP8 scheme is symmetric and needs an all-zero zero_point (got non-zero "
                "values); pass zero_point=None"
            )
        zeros = torch.zeros(expected, dtype=args.zero_point_dtype, device=weight.device)
        return scale.detach().to(device=weight.device, dtype=weight.dtype), zeros
    if zero_point is None:
        if not args.symmetric:
            raise CalibrationError(
                "asymmetric quantization needs a zero_point as well as a scale; pass both"
            )
        zero_point = torch.zeros(expected, dtype=ZERO_POINT_DTYPE, device=weight.device)
    if tuple(zero_point.shape) != expected:
        raise CalibrationError(
            f"zero_point has shape {_shape(zero_point)}, expected {_shape(expected)} (the "
            f"scale's shape)"
        )
    if zero_point.dtype.is_floating_point:
        if not torch.equal(zero_point, zero_point.round()):
            raise CalibrationError("zero_point must hold integers (got fractional values)")
    if zero_point.numel():
        lo, hi = int(zero_point.min()), int(zero_point.max())
        if lo < args.q_min or hi > args.q_max:
            raise CalibrationError(
                f"zero_point must lie in [{args.q_min}, {args.q_max}] for {args.num_bits} bits "
                f"(got values in [{lo}, {hi}])"
            )
        if args.symmetric and (lo, hi) != (0, 0):
            raise CalibrationError(
                "a symmetric scheme needs an all-zero zero_point (got non-zero values); "
                "use an asymmetric scheme or pass zero_point=None"
            )
    device = weight.device
    return (
        scale.detach().to(device=device, dtype=weight.dtype),
        zero_point.detach().to(device=device, dtype=ZERO_POINT_DTYPE),
    )


# Set by ``llmc.models.load_model`` on parameters whose storage nothing else shares: a compressed
# weight is then written into the parameter (into the checkpoint's copy-on-write pages) rather
# than assigned beside it.
EXCLUSIVE = "_llmc_exclusive"


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        del module._parameters[name]
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value)


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: fake quantization of the Linear's input, dynamic or static."""
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.input_activations is None or not args:
        return None
    inputs = scheme.input_activations
    if inputs.dynamic:  # True, or "local": NVFP4's per-group scales under a static global one
        global_scale = getattr(module, "input_global_scale", None)
        if inputs.has_global_scale and global_scale is None:
            raise CalibrationError(
                "input activations with strategy 'tensor_group' (NVFP4) need an input_global_scale "
                "buffer from calibration (observed min/max through input_global_scale_from_range)"
            )
        return (dynamic_activation_fake_quantize(args[0], inputs, global_scale), *args[1:])
    scale = getattr(module, "input_scale", None)
    if scale is None:  # not calibrated yet
        return None
    # the loaded checkpoint has no zero point for a symmetric scheme; adding zeros would turn
    # -0 into +0, so none is added here either
    zero_point = None if inputs.symmetric else module.input_zero_point
    return (static_activation_fake_quantize(args[0], scale, zero_point, inputs), *args[1:])


def has_static_inputs(scheme: QuantizationScheme) -> bool:
    """Whether ``scheme``'s input scale, or NVFP4's input global scale, is fixed at calibration
    (and so needs data)."""
    inputs = scheme.input_activations
    return inputs is not None and (not inputs.dynamic or inputs.has_global_scale)


@torch.no_grad()
def set_input_qparams_(
    module: nn.Linear, scheme: QuantizationScheme, scale: torch.Tensor, zero_point: torch.Tensor
) -> None:
    """Install a Linear's static input ``scale``/``zero_point`` (from its input observer).

    Stored as compressed-tensors creates them: the scale in the weight's dtype with shape
    ``[1]``, the zero point int8 (float8_e4m3fn for FP8). They take effect once the module is
    quantized with ``scheme`` (before or after this call), whose inputs must be static.
    """
    if not isinstance(scheme, QuantizationScheme) or not has_static_inputs(scheme) or scheme.input_activations.dynamic:
        raise ArgumentError(
            "set_input_qparams_ needs a scheme with static input_activations (dynamic false)",
            name="scheme",
        )
    if tuple(scale.shape) != (1,):
        raise CalibrationError(f"input scale has shape {_shape(scale)}, expected [1] (strategy 'tensor')")
    grid = grid_of(scheme.input_activations)
    device = module.weight.device
    _set_buffer(module, "input_scale", scale.detach().to(device=device, dtype=module.weight.dtype))
    _set_buffer(module, "input_zero_point", zero_point.detach().to(device=device, dtype=grid.zero_point_dtype))


def input_global_scale_from_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """NVFP4's ``input_global_scale`` from the observed minimum and maximum of a Linear's input
    over the calibration tokens (llm-compressor's ``static_minmax``): float32 ``[1]``."""
    return global_scale_from_range(lo, hi)


@torch.no_grad()
def set_input_global_scale_(module: nn.Linear, global_scale: torch.Tensor) -> None:
    """Install NVFP4's static ``input_global_scale`` (float32 ``[1]``), under which the input's
    per-group FP8 scales are computed at run time, as the checkpoint stores it."""
    _set_buffer(module, "input_global_scale", global_scale.detach().to(device=module.weight.device, dtype=torch.float32).reshape(1))


def _global_scale(
    module: nn.Linear, scheme: QuantizationScheme, global_scale: torch.Tensor | None
) -> torch.Tensor | None:
    """The float32 ``[1]`` global scale of an NVFP4 weight: the one given (shared by fused
    siblings such as q/k/v), else the weight's own; None for schemes without one."""
    if not scheme.weights.has_global_scale:
        if global_scale is not None:
            raise ArgumentError(
                f"global_scale is only for strategy 'tensor_group' (got strategy "
                f"{scheme.weights.strategy!r})",
                name="global_scale",
            )
        return None
    if global_scale is None:
        global_scale = global_scale_from_range(*torch.aminmax(module.weight.detach()))
    # A copy: siblings share the value, never the storage (a checkpoint writes each once).
    return global_scale.detach().to(device=module.weight.device, dtype=torch.float32).reshape(1).clone()


def _set_input_hook(module: nn.Module, enabled: bool) -> None:
    """Install or remove the input hook; at most one is ever installed (and it keeps its place)."""
    if not enabled:
        remove_forward_pre_hooks(module, _quantize_input_hook)
    elif not has_forward_pre_hook(module, _quantize_input_hook):
        module.register_forward_pre_hook(_quantize_input_hook)


@torch.no_grad()
def set_quantized_weight_(
    module: nn.Linear,
    scheme: QuantizationScheme,
    *,
    weight_fake_quantized: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None = None,
) -> None:
    """Install a solver's result: a weight on the quantization grid and its ``scale``/``zero_point``.

    The weight is snapped to the grid of the stored scale (the scale is kept in the weight's
    dtype, as in the checkpoint): its codes are recovered exactly (``recover_codes``) and the
    weight becomes ``(q - zero_point) * scale``. For a weight computed on that grid this is a
    no-op, and the module then computes exactly what the saved checkpoint will.
    """
    _check_linear(module, scheme)
    if tuple(weight_fake_quantized.shape) != tuple(module.weight.shape):
        raise CalibrationError(
            f"quantized weight has shape {_shape(weight_fake_quantized)}, expected "
            f"{_shape(module.weight)}"
        )
    scale, zero_point = _checked_qparams(module, scheme, scale, zero_point)
    global_scale = _global_scale(module, scheme, global_scale)
    weight = weight_fake_quantized.detach().to(device=module.weight.device)
    grid_scale = effective_scale(scale, global_scale)
    codes = recover_codes(weight, grid_scale, zero_point, scheme.weights)
    _install(module, scheme, codes, scale, zero_point, global_scale)


def _install(
    module: nn.Linear,
    scheme: QuantizationScheme,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
) -> None:
    """The weight ``dequantize(codes)`` and its buffers, from checked parameters."""
    grid_scale = effective_scale(scale, global_scale)
    on_grid = dequantize(codes, grid_scale, zero_point, scheme.weights, module.weight.dtype)
    if getattr(module.weight, EXCLUSIVE, False) and on_grid.device == module.weight.device:
        module.weight.data.copy_(on_grid)  # into a loaded checkpoint's pages (llmc.models)
    else:
        module.weight.data = on_grid
    _set_buffer(module, "weight_scale", scale)
    _set_buffer(module, "weight_zero_point", zero_point)
    if global_scale is not None:
        _set_buffer(module, "weight_global_scale", global_scale)
    elif "weight_global_scale" in module._buffers:
        del module._buffers["weight_global_scale"]
    module.quantization_scheme = scheme
    _set_input_hook(module, scheme.input_activations is not None)


@torch.no_grad()
def quantize_linear_(
    module: nn.Linear,
    scheme: QuantizationScheme,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> None:
    """Quantize ``module`` in place by round-to-nearest (RTN).

    Without ``scale`` the weight observer's parameters are used (min-max, or the MSE search
    with ``observer: mse``); with it (and a
    ``zero_point`` for asymmetric schemes) the weight is rounded onto that grid instead.
    ``global_scale`` (NVFP4 only) replaces the weight's own, so that fused siblings (q/k/v,
    gate/up) share one as vLLM needs. Calling it again re-quantizes from the current weight
    and never stacks input hooks.
    """
    _check_linear(module, scheme)
    weight = module.weight.data
    if scale is None:
        if zero_point is not None:
            raise ArgumentError(
                "zero_point was given without scale; pass both or neither", name="zero_point"
            )
    global_scale = _global_scale(module, scheme, global_scale)
    if scale is None:
        if scheme.weights.observer in ("mse", "memoryless_mse") and global_scale is None:
            scale, zero_point = observe_weight(weight, scheme.weights)
        else:  # the min-max observers all give the weight's own range
            scale, zero_point = compute_qparams(weight, scheme.weights, global_scale)
    scale, zero_point = _checked_qparams(module, scheme, scale, zero_point)
    # Round with the reference's arithmetic, in the weight's dtype, as compressed-tensors
    # would when compressing this weight. Its FP4/FP6 compressors add no zero point, which
    # keeps an exact -0.0 weight's code -0 on FP6 (the FP4 rounding makes it +0 either way).
    grid = grid_of(scheme.weights)
    rounding_zero_point = None if grid.is_float and grid.cast_dtype is None else zero_point
    # the codes of this rounding are the installed weight's: no need to recover them
    codes = quantize(weight, effective_scale(scale, global_scale), rounding_zero_point, scheme.weights)
    _install(module, scheme, codes, scale, zero_point, global_scale)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` was quantized by ``quantize_linear_`` or ``set_quantized_weight_``."""
    return (
        isinstance(module, nn.Linear)
        and isinstance(getattr(module, "quantization_scheme", None), QuantizationScheme)
        and isinstance(getattr(module, "weight_scale", None), torch.Tensor)
    )


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` of every quantized Linear, in ``named_modules`` order."""
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


@torch.no_grad()
def weight_codes(module: nn.Linear) -> torch.Tensor:
    """The codes ``q`` of a quantized Linear's weight, recovered exactly from the grid.

    int8, or float8_e4m3fn for FP8 schemes.
    """
    if not is_quantized(module):
        raise ArgumentError(
            f"module is not quantized (a {type(module).__name__} without quantization_scheme "
            f"and weight_scale); call quantize_linear_ first",
            name="module",
        )
    return recover_codes(
        module.weight,
        effective_scale(module.weight_scale, getattr(module, "weight_global_scale", None)),
        module.weight_zero_point,
        module.quantization_scheme.weights,
    )
