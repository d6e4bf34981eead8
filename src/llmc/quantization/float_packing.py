"""Packing of FP4 (E2M1) and FP6 (E2M3) codes into bytes, as compressed-tensors stores them.

A code is the format's own bit pattern: sign in the top bit, then the exponent field (0 for
the subnormals, ``e - e_min + 1`` for a magnitude ``(1 + f) * 2^e``), then ``m`` mantissa bits.
The codes of a row are laid end to end as a little-endian bit stream, element ``i`` in stream
bits ``[i*b, (i+1)*b)``:

- FP4 (``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``): two codes per byte, the even
  element in the low nibble; ``weight_packed: uint8 [rows, cols / 2]``.
- FP6 (``mxfp6-pack-quantized``): four codes per three bytes; ``[rows, 3 * cols / 4]``.

The sign bit is taken from the value's sign, so -0.0 (a small negative weight) keeps it.
"""

from __future__ import annotations

import math

import torch

from llmc.errors import SaveError
from llmc.quantization.grids import Grid

__all__ = ["pack_float_codes", "unpack_float_codes"]


def _bits_of(grid: Grid) -> int:
    exponent_bits = {(1, 0): 2, (3, 0): 2}[(grid.mantissa_bits, grid.min_normal_exponent)]
    return 1 + exponent_bits + grid.mantissa_bits


def _bit_patterns(values: torch.Tensor, grid: Grid) -> torch.Tensor:
    """int32 codes of values on ``grid`` (float32, any shape)."""
    m, e_min = grid.mantissa_bits, grid.min_normal_exponent
    magnitude = values.abs().to(torch.float32)
    fraction, exponent = torch.frexp(magnitude)  # magnitude = fraction * 2^exponent
    exponent = exponent - 1
    normal = exponent >= e_min
    # normals: field (e - e_min + 1, (2 * fraction - 1) * 2^m); subnormals: magnitude / 2^(e_min - m)
    mantissa = torch.where(normal, (2 * fraction - 1) * (1 << m), torch.ldexp(magnitude, torch.tensor(m - e_min)))
    field = torch.where(normal, exponent - e_min + 1, 0)
    codes = (field << m) + mantissa.to(torch.int32)
    sign = torch.signbit(values).to(torch.int32) << (_bits_of(grid) - 1)
    return codes | sign


def _per_word(num_bits: int) -> int:
    """Codes per run of whole bytes: 2 for 4 bits, 4 for 6 bits."""
    return 8 // math.gcd(8, num_bits)


def pack_float_codes(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``uint8 [rows, cols * b / 8]`` from float codes ``[rows, cols]`` on an FP4/FP6 grid."""
    num_bits = _bits_of(grid)
    rows, cols = codes.shape
    per_word = _per_word(num_bits)
    if cols % per_word:
        raise SaveError(
            f"FP{num_bits} packing needs a multiple of {per_word} columns (got {cols})"
        )
    bits = _bit_patterns(codes, grid).reshape(rows, cols // per_word, per_word)
    word = torch.zeros(bits.shape[:-1], dtype=torch.int32, device=codes.device)
    for i in range(per_word):
        word |= bits[..., i] << (num_bits * i)
    n_bytes = per_word * num_bits // 8
    packed = torch.stack([(word >> (8 * j)) & 0xFF for j in range(n_bytes)], dim=-1)
    return packed.to(torch.uint8).reshape(rows, cols * num_bits // 8)


def unpack_float_codes(packed: torch.Tensor, grid: Grid, cols: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` values from ``pack_float_codes``' bytes (for tests and tools)."""
    num_bits = _bits_of(grid)
    per_word = _per_word(num_bits)
    n_bytes = per_word * num_bits // 8
    rows = packed.shape[0]
    chunks = packed.reshape(rows, cols // per_word, n_bytes).to(torch.int32)
    word = torch.zeros(chunks.shape[:-1], dtype=torch.int32, device=packed.device)
    for j in range(n_bytes):
        word |= chunks[..., j] << (8 * j)
    codes = torch.stack([(word >> (num_bits * i)) & ((1 << num_bits) - 1) for i in range(per_word)], dim=-1)
    m, e_min = grid.mantissa_bits, grid.min_normal_exponent
    magnitude_bits = codes & ((1 << (num_bits - 1)) - 1)
    field, mantissa = magnitude_bits >> m, (magnitude_bits & ((1 << m) - 1)).to(torch.float32)
    normal = torch.ldexp(1 + mantissa / (1 << m), field + e_min - 1)
    subnormal = torch.ldexp(mantissa, torch.tensor(e_min - m))
    values = torch.where(field > 0, normal, subnormal)
    values = torch.where(codes >> (num_bits - 1) != 0, -values, values)
    return values.reshape(rows, cols)
