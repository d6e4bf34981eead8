"""The grids quantized values live on: signed integers of 2-8 bits, and FP8 E4M3.

A grid is what ``math.py`` needs to know about a number format and nothing else: the range
codes are clamped to, how a value in that range is rounded onto the grid, and the dtypes the
codes and zero points are stored in. Both follow compressed-tensors 0.20
(``calculate_range``, ``round_to_quantized_type_args``, ``QuantizationArgs.pytorch_dtype``):

- ``int`` with ``b`` bits: ``[q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]``, rounded half to even
  (``torch.round``), codes and zero points int8.
- ``float`` with 8 bits (FP8 E4M3, ``torch.float8_e4m3fn``): ``[-448, 448]``, rounded by
  casting to ``float8_e4m3fn`` after clamping (round to nearest even on the 3-bit mantissa,
  subnormals down to 2^-9), codes and zero points ``float8_e4m3fn``. The min-max scale is then
  ``max|w| / 448``, since ``(q_max - q_min) / 2 = 448``.
"""

from __future__ import annotations

import attrs
import torch

from llmc.errors import ArgumentError

__all__ = ["FP8_E4M3", "FP8_E4M3_MAX", "Grid", "grid_of"]

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = torch.finfo(FP8_E4M3).max  # 448.0


@attrs.frozen
class Grid:
    """The values codes may take: ``[q_min, q_max]``, a rounding rule and storage dtypes."""

    q_min: int | float
    q_max: int | float
    code_dtype: torch.dtype
    zero_point_dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        return self.code_dtype.is_floating_point

    def round_(self, scaled: torch.Tensor) -> torch.Tensor:
        """Clamp ``scaled`` to the range and round it onto the grid, keeping its dtype.

        Integer grids work in place; the FP8 cast needs a new tensor (returned either way).
        """
        scaled.clamp_(self.q_min, self.q_max)
        if self.is_float:
            return scaled.to(self.code_dtype).to(scaled.dtype)
        return scaled.round_()


_INT_GRIDS = {
    bits: Grid(-(1 << (bits - 1)), (1 << (bits - 1)) - 1, torch.int8, torch.int8)
    for bits in range(1, 9)
}
_FP8_E4M3_GRID = Grid(-FP8_E4M3_MAX, FP8_E4M3_MAX, FP8_E4M3, FP8_E4M3)


def grid_of(args) -> Grid:
    """The grid of ``QuantizationArgs`` (anything with ``type`` and ``num_bits``)."""
    if args.type == "int" and args.num_bits in _INT_GRIDS:
        return _INT_GRIDS[args.num_bits]
    if args.type == "float" and args.num_bits == 8:
        return _FP8_E4M3_GRID
    raise ArgumentError(
        f"no quantization grid for type {args.type!r} with {args.num_bits} bits; "
        f"supported: int with 2-8 bits, float with 8 bits (FP8 E4M3)",
        name="num_bits",
    )
