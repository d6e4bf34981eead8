"""Our int32 packing must be compressed-tensors' layout exactly: vLLM and transformers unpack
``weight_packed`` and packed zero points with their own code."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32 as ct_pack_to_int32,
)
from compressed_tensors.compressors.pack_quantized.helpers import (
    unpack_from_int32 as ct_unpack_from_int32,
)

from llmc.errors import ArgumentError
from llmc.quantization import pack_to_int32, packed_size, unpack_from_int32

BITS = [2, 3, 4, 8]
SHAPES = {"aligned-64x128": (64, 128), "ragged-7x45": (7, 45), "single-1x1": (1, 1)}


def _random_codes(shape: tuple[int, ...], num_bits: int, seed: int = 0) -> torch.Tensor:
    low, high = -(1 << (num_bits - 1)), 1 << (num_bits - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator).to(torch.int8)


@pytest.mark.parametrize("packed_dim", [0, 1], ids=["dim0", "dim1"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_bits", BITS, ids=lambda b: f"int{b}")
def test_pack_to_int32_equals_compressed_tensors(num_bits, shape, packed_dim):
    codes = _random_codes(shape, num_bits)
    packed = pack_to_int32(codes, num_bits, packed_dim)
    expected = ct_pack_to_int32(codes, num_bits, packed_dim)
    assert packed.dtype == torch.int32
    assert packed.shape == expected.shape
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("packed_dim", [0, 1], ids=["dim0", "dim1"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_bits", BITS, ids=lambda b: f"int{b}")
def test_unpack_from_int32_inverts_pack(num_bits, shape, packed_dim):
    codes = _random_codes(shape, num_bits, seed=1)
    packed = pack_to_int32(codes, num_bits, packed_dim)
    assert torch.equal(unpack_from_int32(packed, num_bits, shape, packed_dim), codes)
    assert torch.equal(ct_unpack_from_int32(packed, num_bits, torch.Size(shape), packed_dim), codes)


@pytest.mark.parametrize("num_bits", BITS, ids=lambda b: f"int{b}")
def test_pack_to_int32_batched_equals_compressed_tensors(num_bits):
    codes = _random_codes((3, 8, 40), num_bits, seed=2)
    packed = pack_to_int32(codes, num_bits)
    assert torch.equal(packed, ct_pack_to_int32(codes, num_bits))
    assert torch.equal(unpack_from_int32(packed, num_bits, codes.shape), codes)


def test_pack_to_int32_int4_element0_in_low_nibble():
    codes = torch.tensor([[3, -8, 7, 0, -1, 1, 2, -2]], dtype=torch.int8)
    word = int(pack_to_int32(codes, 4)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [int(c) + 8 for c in codes[0]]
    assert word & 0xF == 11


def test_pack_to_int32_int3_straddles_words():
    # element 10 of a 3-bit row occupies stream bits 30-32: two bits in word 0, one in word 1
    codes = torch.full((1, 32), -4, dtype=torch.int8)  # unsigned 0
    codes[0, 10] = 3  # unsigned 7 = 0b111
    packed = pack_to_int32(codes, 3)
    assert packed.shape == (1, 3)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(packed[0, 1]) == 0b1


def test_packed_size_counts_words():
    assert packed_size(256, 4) == 32
    assert packed_size(45, 3) == 5
    assert packed_size(1, 8) == 1


def test_pack_to_int32_out_of_range_raises():
    with pytest.raises(
        ArgumentError,
        match=r"^codes must lie in \[-8, 7\] for 4-bit packing \(got values in \[-9, 7\]\)$",
    ):
        pack_to_int32(torch.tensor([[-9, 7]], dtype=torch.int8), 4)


def test_pack_to_int32_float_input_raises():
    with pytest.raises(
        ArgumentError, match=r"codes must be an integer tensor \(got dtype torch.float32\)"
    ):
        pack_to_int32(torch.zeros(2, 8), 4)


def test_unpack_from_int32_wrong_width_raises():
    with pytest.raises(ArgumentError, match=r"packed tensor has 3 words per line, expected 2"):
        unpack_from_int32(torch.zeros(1, 3, dtype=torch.int32), 4, (1, 16))


@pytest.mark.parametrize("num_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 32, 37, 96])
def test_whole_word_packing_equals_block_packing(num_bits, cols):
    from llmc.quantization.packing import _pack_blocks, _pack_whole_words

    generator = torch.Generator().manual_seed(num_bits * 100 + cols)
    values = torch.randint(0, 1 << num_bits, (5, cols), generator=generator, dtype=torch.int64)
    assert torch.equal(_pack_whole_words(values, num_bits), _pack_blocks(values, num_bits))


@pytest.mark.parametrize("num_bits", [2, 3, 4, 8])
def test_packing_a_few_rows_at_a_time_equals_packing_the_whole_weight(monkeypatch, num_bits):
    from llmc.quantization import packing

    low, high = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    codes = torch.randint(low, high + 1, (37, 200), dtype=torch.int8, generator=torch.Generator().manual_seed(num_bits))
    whole = packing.pack_to_int32(codes, num_bits)
    monkeypatch.setattr(packing, "_PIECE_ELEMENTS", 200 * 5)  # 5 rows a piece, a ragged last one
    assert torch.equal(packing.pack_to_int32(codes, num_bits), whole)
