"""The compressed-tensors formats llmc writes, one registered writer per format.

A format is how a quantized Linear's tensors are laid out in the checkpoint; compressed-tensors
names it in each config group (``"format": "pack-quantized"``) and its loader picks the matching
decompressor. Each ``FormatWriter`` knows which schemes it is the natural format for (so a
scheme without an explicit ``format`` gets the one compressed-tensors itself would infer) and
which tensors it writes. A new format (``nvfp4-pack-quantized``, ``mxfp8-quantized``, ...) is
one more ``register_format`` call here, nothing else in the writer changes.

What transformers (through compressed-tensors 0.20) and vLLM expect, per format:

- ``pack-quantized`` (integer weights, no activation quantization): ``weight_packed`` int32
  ``[out, ceil(in*b/32)]``, ``weight_scale`` (weight dtype), ``weight_shape`` int64 ``[2]``,
  and for asymmetric group/channel schemes ``weight_zero_point`` packed along dim 0.
- ``int-quantized`` (int weights with quantized inputs: W8A8, W4A8, W4AFP8): int8 ``weight``
  (one code per weight, whatever its bits) + ``weight_scale`` (+ int8 ``weight_zero_point``
  when asymmetric).
- ``float-quantized`` (FP8 weights with quantized inputs, e.g. FP8_DYNAMIC): ``weight``
  float8_e4m3fn ``[out, in]`` + ``weight_scale`` ``[out, 1]`` (channel) or ``[1]`` (tensor),
  in the weight's dtype; no zero point (FP8 is symmetric).
- ``naive-quantized``: the same one-code-per-weight layout in the codes' own dtype (int8 or
  float8_e4m3fn). compressed-tensors falls back to it for every scheme no other format takes,
  which among llmc's schemes means FP8 weights without input quantization.
- ``float-quantized`` also holds FP8_BLOCK: ``weight_scale`` ``[ceil(out/128), ceil(in/128)]``.
- ``mxfp4-pack-quantized`` / ``mxfp6-pack-quantized`` (FP4/FP6 in groups of 32):
  ``weight_packed`` uint8 ``[out, in/2]`` / ``[out, 3*in/4]`` (``float_packing``) and
  ``weight_scale`` uint8 ``[out, in/32]``, the E8M0 exponent ``127 + log2(scale)``.
- ``mxfp8-quantized``: ``weight`` float8_e4m3fn ``[out, in]`` and the same uint8 scales.
- ``nvfp4-pack-quantized`` (FP4 in groups of 16): ``weight_packed`` uint8 ``[out, in/2]``,
  ``weight_scale`` float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` float32 ``[1]``
  (and ``input_global_scale`` from calibration for NVFP4, kept from the module's buffers).
- ``dense`` (``save_compressed=False``, status ``frozen``): a float ``weight``,
  ``weight_scale`` and always ``weight_zero_point`` (int8, or float8_e4m3fn zeros for FP8),
  because the loader creates a zero point for every non-compressed module and re-applies fake
  quantization on each forward (float formats: FP8 zeros, the scale's float value, and
  NVFP4's ``weight_global_scale``). The weight is ``loader_stable_weight``: the fake-quantized
  weight, nudged by one ulp where bfloat16 rounding would otherwise move a code when the
  loader re-quantizes it.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn

from llmc.errors import SaveError, did_you_mean
from llmc.quantization.float_packing import pack_float_codes
from llmc.quantization.grids import FP8_E4M3, grid_of
from llmc.quantization.math import (
    ZERO_POINT_DTYPE,
    e8m0_from_float,
    effective_scale,
    loader_stable_weight,
)
from llmc.quantization.module import weight_codes
from llmc.quantization.packing import pack_to_int32
from llmc.quantization.scheme import QuantizationScheme

__all__ = [
    "DENSE",
    "FormatWriter",
    "format_writer",
    "group_format",
    "register_format",
    "registered_formats",
]

DENSE = "dense"


@attrs.frozen
class FormatWriter:
    """One compressed-tensors format: when it is inferred and what it writes.

    ``infers(scheme)`` says whether a scheme without an explicit format is saved in this format
    (writers are asked in registration order, the first that says yes wins);
    ``tensors(module, save_compressed)`` returns the checkpoint tensors of one quantized Linear
    by local name (``weight_packed``, ``weight_scale``, ...).
    """

    name: str
    tensors: Callable[[nn.Linear, bool], dict[str, torch.Tensor]]
    infers: Callable[[QuantizationScheme], bool] = lambda scheme: False


_WRITERS: dict[str, FormatWriter] = {}


def register_format(writer: FormatWriter) -> FormatWriter:
    """Add a format; a name registered twice is a programming error, refused."""
    if writer.name in _WRITERS:
        raise SaveError(f"a writer for format {writer.name!r} is already registered")
    _WRITERS[writer.name] = writer
    return writer


def registered_formats() -> tuple[str, ...]:
    """The format names there is a writer for, in inference order."""
    return tuple(_WRITERS)


def format_writer(name: str) -> FormatWriter:
    """The writer of format ``name``; an unknown name is a ``SaveError`` with the closest."""
    writer = _WRITERS.get(name)
    if writer is None:
        raise SaveError(f"no writer for the compressed-tensors format {name!r}{did_you_mean(name, _WRITERS)}")
    return writer


def group_format(scheme: QuantizationScheme, *, save_compressed: bool) -> str:
    """The compressed-tensors format a module with ``scheme`` is written in.

    ``save_compressed=False`` writes ``dense``; a format set on the scheme wins; otherwise the
    first registered writer that infers the scheme (compressed-tensors' own inference order).
    """
    if not save_compressed:
        return DENSE
    if scheme.format is not None:
        return scheme.format
    for writer in _WRITERS.values():
        if writer.infers(scheme):
            return writer.name
    raise SaveError(f"no registered format writes the scheme {scheme.to_config_dict()}")


def _is_int_weight_only(scheme: QuantizationScheme) -> bool:
    return scheme.weights is not None and scheme.weights.type == "int" and scheme.input_activations is None


def _is_int_with_inputs(scheme: QuantizationScheme) -> bool:
    """Int weights with quantized inputs of any type (W8A8, W4A8, W4AFP8): one int8 code per
    weight, as compressed-tensors' int-quantized compressor claims them before pack-quantized."""
    return scheme.weights is not None and scheme.weights.type == "int" and scheme.input_activations is not None


def _is_float_with_inputs(scheme: QuantizationScheme) -> bool:
    return scheme.weights is not None and scheme.weights.type == "float" and scheme.input_activations is not None


def _has_weights(scheme: QuantizationScheme) -> bool:
    return scheme.weights is not None


def _float_weights(num_bits: int, group_size: int, *, mx_scales: bool = False):
    """compressed-tensors' ``can_compress`` of the MX and NVFP4 compressors: float weights of
    ``num_bits`` in groups of ``group_size`` (MXFP8 also needs E8M0 scales, since FP8 groups
    of 32 with float scales are plain ``float-quantized``)."""

    def infers(scheme: QuantizationScheme) -> bool:
        weights = scheme.weights
        return (
            weights is not None
            and weights.type == "float"
            and weights.num_bits == num_bits
            and weights.group_size == group_size
            and (weights.is_mx or not mx_scales)
        )

    return infers


def _packed_float(module: nn.Linear, save_compressed: bool) -> dict[str, torch.Tensor]:
    """FP4/FP6 codes packed into bytes, with FP8 (NVFP4) or E8M0 (MX) scales."""
    args = module.quantization_scheme.weights
    tensors = {"weight_packed": pack_float_codes(weight_codes(module), grid_of(args))}
    if args.is_mx:
        tensors["weight_scale"] = e8m0_from_float(module.weight_scale.detach())
    else:
        tensors["weight_scale"] = module.weight_scale.detach().to(FP8_E4M3)
        tensors["weight_global_scale"] = module.weight_global_scale.detach()
    return tensors


def _mx_codes(module: nn.Linear, save_compressed: bool) -> dict[str, torch.Tensor]:
    """One FP8 code per weight with E8M0 group scales (``mxfp8-quantized``)."""
    return {"weight": weight_codes(module), "weight_scale": e8m0_from_float(module.weight_scale.detach())}


def _pack_quantized(module: nn.Linear, save_compressed: bool) -> dict[str, torch.Tensor]:
    args = module.quantization_scheme.weights
    tensors = {
        "weight_scale": module.weight_scale.detach(),
        "weight_packed": pack_to_int32(weight_codes(module), args.num_bits, packed_dim=1),
        "weight_shape": torch.tensor(tuple(module.weight.shape), dtype=torch.int64),
    }
    if not args.symmetric:
        zero_point = module.weight_zero_point.detach().to(ZERO_POINT_DTYPE)
        if args.strategy in ("group", "channel"):
            zero_point = pack_to_int32(zero_point, args.num_bits, packed_dim=0)
        tensors["weight_zero_point"] = zero_point
    return tensors


def _unpacked_codes(module: nn.Linear, save_compressed: bool) -> dict[str, torch.Tensor]:
    """One code per weight, int8 or float8_e4m3fn (``int-quantized``, ``float-quantized``,
    ``naive-quantized``)."""
    tensors = {"weight_scale": module.weight_scale.detach(), "weight": weight_codes(module)}
    if not module.quantization_scheme.weights.symmetric:
        tensors["weight_zero_point"] = module.weight_zero_point.detach().to(ZERO_POINT_DTYPE)
    return tensors


def _dense(module: nn.Linear, save_compressed: bool) -> dict[str, torch.Tensor]:
    args = module.quantization_scheme.weights
    scale = module.weight_scale.detach()
    zero_point = module.weight_zero_point.detach().to(grid_of(args).zero_point_dtype)
    tensors = {"weight_scale": scale}
    global_scale = getattr(module, "weight_global_scale", None)
    if global_scale is not None:  # NVFP4: the loader divides the scale by it
        tensors["weight_global_scale"] = global_scale.detach()
    if save_compressed:  # compressed status: the loader uses the weight as it is
        tensors["weight"] = module.weight.detach()
    else:  # frozen status: the loader fake-quantizes the weight on every forward
        grid_scale = effective_scale(scale, global_scale)
        tensors["weight"] = loader_stable_weight(weight_codes(module), grid_scale, zero_point, args, module.weight.dtype)
    if not save_compressed or not args.symmetric:
        tensors["weight_zero_point"] = zero_point
    return tensors


# Registration order is inference order (compressed-tensors' COMPRESSION_FORMAT_PRIORITY:
# the MX formats, NVFP4, int with any inputs, int weight-only, float with inputs, then naive
# for whatever is left).
register_format(FormatWriter("mxfp4-pack-quantized", _packed_float, infers=_float_weights(4, 32)))
register_format(FormatWriter("mxfp6-pack-quantized", _packed_float, infers=_float_weights(6, 32)))
register_format(
    FormatWriter("mxfp8-quantized", _mx_codes, infers=_float_weights(8, 32, mx_scales=True))
)
register_format(FormatWriter("nvfp4-pack-quantized", _packed_float, infers=_float_weights(4, 16)))
register_format(FormatWriter("int-quantized", _unpacked_codes, infers=_is_int_with_inputs))
register_format(FormatWriter("pack-quantized", _pack_quantized, infers=_is_int_weight_only))
register_format(FormatWriter("float-quantized", _unpacked_codes, infers=_is_float_with_inputs))
register_format(FormatWriter("naive-quantized", _unpacked_codes, infers=_has_weights))
register_format(FormatWriter(DENSE, _dense))
