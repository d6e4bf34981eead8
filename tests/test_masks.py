"""Sparsity masks are kept as bits: what a pruning modifier records is what later modifiers read."""

from __future__ import annotations

import pytest
import torch

from llmc.masks import (
    MASK_BUFFER,
    apply_mask_,
    mask_summary,
    set_sparsity_mask_,
    sparsity_mask,
)


def _module(*shape: int) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    return module


@pytest.mark.parametrize("shape", [(5, 13), (7, 16), (1, 1), (3, 4, 17), (64, 576)])
def test_masks_round_trip_exactly_at_one_bit_per_weight(shape):
    module = _module(*shape)
    kept = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) > 0.5
    set_sparsity_mask_(module, kept)
    stored = getattr(module, MASK_BUFFER)
    assert stored.dtype == torch.uint8
    assert stored.numel() == kept[..., 0].numel() * -(-shape[-1] // 8)  # ceil(cols / 8) a row
    assert torch.equal(sparsity_mask(module), kept)
    assert mask_summary(module).pruned == int((~kept).sum())


def test_masks_are_replaced_moved_and_never_saved():
    module = _module(4, 24)
    first = torch.zeros(4, 24, dtype=torch.bool)
    first[:, ::2] = True
    set_sparsity_mask_(module, first)
    second = ~first
    set_sparsity_mask_(module, second)
    assert torch.equal(sparsity_mask(module), second)
    module.to(torch.float64)
    assert torch.equal(sparsity_mask(module), second)
    assert MASK_BUFFER not in module.state_dict()
    apply_mask_(module)
    assert torch.count_nonzero(module.weight[first]) == 0
    assert torch.count_nonzero(module.weight[second]) == second.sum()


def test_masks_keep_n_of_m_structure_when_packed():
    module = _module(8, 32)
    kept = torch.zeros(8, 8, 4, dtype=torch.bool)
    kept[..., :2] = True  # 2:4 along the inputs
    set_sparsity_mask_(module, kept.reshape(8, 32))
    assert mask_summary(module).structure == (2, 4)


def test_masks_refuse_a_shape_other_than_the_weights():
    with pytest.raises(ValueError, match=r"mask shape \(4, 8\) differs from weight \(4, 9\)"):
        set_sparsity_mask_(_module(4, 9), torch.ones(4, 8, dtype=torch.bool))
