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
- ``dense`` (``save_compressed=False``, status ``frozen``): a float ``weight``,
  ``weight_scale`` and always ``weight_zero_point`` (int8, or float8_e4m3fn zeros for FP8),
  because the loader creates a zero point for every non-compressed module and re-applies fake
  quantization on each forward. The weight is ``loader_stable_weight``: the fake-quantized
  weight, nudged by one ulp where bfloat16 rounding would otherwise move a code when the
  loader re-quantizes it.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn

from llmc.errors import SaveError, did_you_mean
from llmc.quantization.grids import grid_of
from llmc.quantization.math import ZERO_POINT_DTYPE, loader_stable_weight
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
    if save_compressed:  # compressed status: the loader uses the weight as it is
        tensors["weight"] = module.weight.detach()
    else:  # frozen status: the loader fake-quantizes the weight on every forward
        tensors["weight"] = loader_stable_weight(weight_codes(module), scale, zero_point, args, module.weight.dtype)
    if not save_compressed or not args.symmetric:
        tensors["weight_zero_point"] = zero_point
    return tensors


# Registration order is inference order (compressed-tensors' COMPRESSION_FORMAT_PRIORITY:
# int with any inputs, int weight-only, FP8 with inputs, then naive for whatever is left).
register_format(FormatWriter("int-quantized", _unpacked_codes, infers=_is_int_with_inputs))
register_format(FormatWriter("pack-quantized", _pack_quantized, infers=_is_int_weight_only))
register_format(FormatWriter("float-quantized", _unpacked_codes, infers=_is_float_with_inputs))
register_format(FormatWriter("naive-quantized", _unpacked_codes, infers=_has_weights))
register_format(FormatWriter(DENSE, _dense))
