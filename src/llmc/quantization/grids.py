"""The grids quantized values live on: signed integers of 1-8 bits, FP8 E4M3, FP6 E2M3 and FP4
E2M1.

A grid is what ``math.py`` needs to know about a number format and nothing else: the range
codes are clamped to, how a value in that range is rounded onto the grid, and the dtypes the
codes and zero points are kept in. All follow compressed-tensors 0.20 (``calculate_range``,
``round_to_quantized_type_args``, ``cast_to_fp4``, ``cast_to_fp6``):

- ``int`` with ``b`` bits: ``[q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]``, rounded half to even
  (``torch.round``), codes and zero points int8.
- ``float`` grids are described by their mantissa bits ``m``, the exponent ``e_min`` of their
  smallest normal number and their largest value: a magnitude ``|x|`` with binary exponent
  ``e = floor(log2|x|)`` lies on a grid of step ``2^(max(e, e_min) - m)``, and rounding is to
  the nearest step, ties to even, saturating at the largest value.

  ========  ===  =====  =====  ==============================================
  format    m    e_min  max    values
  ========  ===  =====  =====  ==============================================
  FP8 E4M3  3    -6     448    ``torch.float8_e4m3fn`` (rounded by the cast)
  FP6 E2M3  3    0      7.5    steps 1/8 below 2, 1/4 below 4, 1/2 up to 7.5
  FP4 E2M1  1    0      6      0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives
  ========  ===  =====  =====  ==============================================

  FP8 codes are stored as ``float8_e4m3fn``; FP4/FP6 codes have no torch dtype and are kept as
  float32 values on the grid (the writers pack them). The min-max scale is then
  ``max|w| / max``, since ``(q_max - q_min) / 2 = max``.

  One quirk is kept to stay bit-identical: compressed-tensors' FP4 rounding multiplies by
  ``sign(x)``, which turns an input of exactly -0.0 into +0.0 (a small negative value still
  rounds to -0.0, whose packed code has the sign bit), while FP6 and FP8 keep the sign of zero.
"""

from __future__ import annotations

import attrs
import torch

from llmc.errors import ArgumentError

__all__ = ["FP4_E2M1", "FP6_E2M3", "FP8_E4M3", "FP8_E4M3_MAX", "Grid", "grid_of"]

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = torch.finfo(FP8_E4M3).max  # 448.0


@attrs.frozen
class Grid:
    """The values codes may take: ``[q_min, q_max]``, a rounding rule and storage dtypes.

    Float grids set ``mantissa_bits`` and ``min_normal_exponent``; ``cast_dtype`` names a torch
    dtype whose cast rounds exactly as the grid does (FP8), used because it is the reference's
    own rounding and much faster.
    """

    q_min: int | float
    q_max: int | float
    code_dtype: torch.dtype
    zero_point_dtype: torch.dtype
    mantissa_bits: int | None = None
    min_normal_exponent: int | None = None
    cast_dtype: torch.dtype | None = None
    negative_zero_input_to_positive: bool = False

    @property
    def is_float(self) -> bool:
        return self.mantissa_bits is not None

    def round_(self, scaled: torch.Tensor) -> torch.Tensor:
        """Clamp ``scaled`` to the range and round it onto the grid, keeping its dtype.

        Integer grids work in place; float grids need a new tensor (returned either way).
        """
        scaled.clamp_(self.q_min, self.q_max)
        if self.cast_dtype is not None:
            return scaled.to(self.cast_dtype).to(scaled.dtype)
        if self.is_float:
            return self._round_float(scaled)
        return scaled.round_()

    def _round_float(self, x: torch.Tensor) -> torch.Tensor:
        """Round to nearest, ties to even, on the ``2^(max(e, e_min) - m)`` step of ``|x|``."""
        magnitude = x.abs().to(torch.float32)
        _, exponent = torch.frexp(magnitude)  # magnitude = f * 2^exponent, f in [0.5, 1)
        exponent = (exponent - 1).clamp_(min=self.min_normal_exponent)
        step = torch.ldexp(torch.ones_like(magnitude), exponent - self.mantissa_bits)
        rounded = torch.round(magnitude / step).mul_(step).clamp_(max=self.q_max)
        rounded = torch.copysign(rounded, x.to(torch.float32))
        if self.negative_zero_input_to_positive:
            rounded = torch.where(x == 0, torch.zeros_like(rounded), rounded)
        return rounded.to(x.dtype)


_INT_GRIDS = {
    bits: Grid(-(1 << (bits - 1)), (1 << (bits - 1)) - 1, torch.int8, torch.int8)
    for bits in range(1, 9)
}
_FP8_E4M3_GRID = Grid(
    -FP8_E4M3_MAX, FP8_E4M3_MAX, FP8_E4M3, FP8_E4M3, mantissa_bits=3, min_normal_exponent=-6,
    cast_dtype=FP8_E4M3,
)
FP6_E2M3 = Grid(-7.5, 7.5, torch.float32, FP8_E4M3, mantissa_bits=3, min_normal_exponent=0)
FP4_E2M1 = Grid(
    -6.0, 6.0, torch.float32, FP8_E4M3, mantissa_bits=1, min_normal_exponent=0,
    negative_zero_input_to_positive=True,
)
_FLOAT_GRIDS = {8: _FP8_E4M3_GRID, 6: FP6_E2M3, 4: FP4_E2M1}


def grid_of(args) -> Grid:
    """The grid of ``QuantizationArgs`` (anything with ``type`` and ``num_bits``)."""
    if args.type == "int" and args.num_bits in _INT_GRIDS:
        return _INT_GRIDS[args.num_bits]
    if args.type == "float" and args.num_bits in _FLOAT_GRIDS:
        return _FLOAT_GRIDS[args.num_bits]
    raise ArgumentError(
        f"no quantization grid for type {args.type!r} with {args.num_bits} bits; "
        f"supported: int with 1-8 bits, float with 4 (FP4 E2M1), 6 (FP6 E2M3) or 8 bits "
        f"(FP8 E4M3)",
        name="num_bits",
    )
