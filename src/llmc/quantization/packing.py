"""Dense little-endian bit packing of signed codes into int32 words (compressed-tensors layout).

The ``pack-quantized`` format stores a ``b``-bit weight as ``weight_packed: int32 [rows,
ceil(cols * b / 32)]``: each code is shifted to unsigned (``q + 2^(b-1)``, e.g. +8 for int4)
and the codes of a row are laid end to end as one bit stream, element ``i`` occupying stream
bits ``[i*b, (i+1)*b)``, least significant bit first; word ``k`` holds stream bits
``[32k, 32k+32)``. For 4 bits this is the GPTQ/Marlin layout (element 0 in bits 0-3 of word
0); for 3 bits a code can straddle two words. Asymmetric zero points ``[rows, n_groups]`` are
packed the same way along dim 0 (``packed_dim=0``), i.e. down each column.

Codes are handled in blocks of 32 consecutive elements, which always fill exactly ``b`` words::

    elements  e0 e1 ... e31      (32 codes of b bits = 32*b bits)
    words     w0 w1 ... w(b-1)   (b words of 32 bits)
"""

from __future__ import annotations

import math

import torch

from llmc.errors import ArgumentError

__all__ = ["pack_to_int32", "packed_size", "unpack_from_int32"]

_WORD = 32
_LOW32 = 0xFFFFFFFF


def _check_bits(num_bits: int) -> None:
    if num_bits not in range(1, 9):
        raise ArgumentError(
            f"'num_bits' must be between 1 and 8 for int32 packing (got {num_bits})",
            name="num_bits",
        )


def _check_dim(packed_dim: int) -> None:
    if packed_dim not in (0, 1):
        raise ArgumentError(f"'packed_dim' must be 0 or 1 (got {packed_dim})", name="packed_dim")


_PIECE_ELEMENTS = 1 << 22


def packed_size(n: int, num_bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``num_bits`` bits."""
    return math.ceil(n * num_bits / _WORD)


def _element_positions(num_bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 elements of a block: (word, bit offset, bits that fit in that word)."""
    positions = []
    for element in range(_WORD):
        start = element * num_bits
        offset = start % _WORD
        positions.append((start // _WORD, offset, min(num_bits, _WORD - offset)))
    return positions


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as two's-complement int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_whole_words(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Packing when codes never straddle words (b = 1, 2, 4, 8): one shift and one sum.

    Word ``k`` holds elements ``[k·n, (k+1)·n)`` with ``n = 32 / b``, element ``k·n + i`` at
    bit ``i·b``: the general block loop's layout, in three vectorised operations instead of
    32 (the general path took ~2 s to pack one 4-layer 2048-wide model).
    """
    rows, cols = values.shape
    per_word = _WORD // num_bits
    words = math.ceil(cols / per_word)
    values = torch.nn.functional.pad(values, (0, words * per_word - cols))
    shifts = torch.arange(0, _WORD, num_bits, dtype=torch.int64, device=values.device)
    return (values.reshape(rows, words, per_word) << shifts).sum(-1)  # bits never overlap


def _pack_blocks(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Packing for any width, block by block of 32 codes (see the module docstring)."""
    rows, cols = values.shape
    blocks = math.ceil(cols / _WORD)
    values = torch.nn.functional.pad(values, (0, blocks * _WORD - cols))
    values = values.reshape(rows * blocks, _WORD)  # one block of 32 codes per row
    words = torch.zeros(rows * blocks, num_bits, dtype=torch.int64, device=values.device)
    for element, (word, offset, low_bits) in enumerate(_element_positions(num_bits)):
        value = values[:, element]
        words[:, word] |= (value << offset) & _LOW32
        if low_bits < num_bits:  # the high bits spill into the next word
            words[:, word + 1] |= value >> low_bits
    return words.reshape(rows, blocks * num_bits)[:, : packed_size(cols, num_bits)]


def pack_to_int32(codes: torch.Tensor, num_bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Pack signed codes ``[rows, cols]`` into int32 along ``packed_dim``.

    ``packed_dim=1`` gives ``[rows, ceil(cols*b/32)]`` (weights); ``packed_dim=0`` gives
    ``[ceil(rows*b/32), cols]`` (zero points). A leading batch dim (``[E, rows, cols]``) packs
    each matrix separately.
    """
    _check_bits(num_bits)
    _check_dim(packed_dim)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ArgumentError(
            f"codes must be an integer tensor (got dtype {codes.dtype}); quantize first",
            name="codes",
        )
    if codes.ndim > 2:
        return torch.stack([pack_to_int32(c, num_bits, packed_dim) for c in codes])
    if codes.ndim != 2:
        raise ArgumentError(
            f"codes must be 2-D [rows, cols] (got shape {list(codes.shape)})", name="codes"
        )
    q_min, q_max = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < q_min or hi > q_max:
            raise ArgumentError(
                f"codes must lie in [{q_min}, {q_max}] for {num_bits}-bit packing "
                f"(got values in [{lo}, {hi}])",
                name="codes",
            )
    pack = _pack_whole_words if _WORD % num_bits == 0 else _pack_blocks
    if packed_dim == 0:
        values = codes.to(torch.int64).T - q_min  # unsigned, in [0, 2^b)
        return _to_int32(pack(values, num_bits)).T.contiguous()
    # rows pack independently: a few rows at a time, so the int64 temporaries of a 14336-wide
    # weight stay a few tens of MB instead of several times the weight
    rows, cols = codes.shape
    step = max(1, _PIECE_ELEMENTS // max(1, cols))
    packed = torch.empty((rows, packed_size(cols, num_bits)), dtype=torch.int32, device=codes.device)
    for start in range(0, rows, step):
        values = codes[start : start + step].to(torch.int64) - q_min
        packed[start : start + step] = _to_int32(pack(values, num_bits))
    return packed


def unpack_from_int32(
    packed: torch.Tensor,
    num_bits: int,
    shape: tuple[int, ...] | torch.Size,
    packed_dim: int = 1,
) -> torch.Tensor:
    """Inverse of ``pack_to_int32``: int8 codes of the original ``shape``."""
    _check_bits(num_bits)
    _check_dim(packed_dim)
    if packed.dtype != torch.int32:
        raise ArgumentError(
            f"packed must be an int32 tensor (got dtype {packed.dtype})", name="packed"
        )
    if packed.ndim > 2:
        return torch.stack(
            [unpack_from_int32(p, num_bits, tuple(shape)[1:], packed_dim) for p in packed]
        )
    shape = tuple(int(d) for d in shape)
    n = shape[packed_dim]
    words = packed.T if packed_dim == 0 else packed
    rows, n_words = words.shape
    if n_words != packed_size(n, num_bits):
        raise ArgumentError(
            f"packed tensor has {n_words} words per line, expected {packed_size(n, num_bits)} "
            f"for {n} codes of {num_bits} bits",
            name="packed",
        )
    blocks = math.ceil(n / _WORD)
    words = words.to(torch.int64) & _LOW32
    words = torch.nn.functional.pad(words, (0, blocks * num_bits - n_words))
    words = words.reshape(rows * blocks, num_bits)  # the b words of one block per row
    mask = (1 << num_bits) - 1
    values = torch.empty(rows * blocks, _WORD, dtype=torch.int64, device=packed.device)
    for element, (word, offset, low_bits) in enumerate(_element_positions(num_bits)):
        value = words[:, word] >> offset
        if low_bits < num_bits:
            value = value | (words[:, word + 1] << low_bits)
        values[:, element] = value & mask
    codes = values.reshape(rows, blocks * _WORD)[:, :n] - (1 << (num_bits - 1))
    codes = codes.to(torch.int8)
    return (codes.T if packed_dim == 0 else codes).contiguous()
