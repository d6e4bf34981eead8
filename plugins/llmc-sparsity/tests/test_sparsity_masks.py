"""Mask selection: exact counts, N:M structure, nesting, Wanda scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc_sparsity.magnitude_modifier import magnitude_kept_mask
from llmc_sparsity.masks_nm import (
    nm_kept_mask,
    parse_mask_structure,
    pruned_count,
    row_kept_mask,
    tensor_kept_mask,
)
from llmc_sparsity.wanda import ColumnNormAccumulator, wanda_kept_mask, wanda_scores

FAST = settings(max_examples=40, deadline=None)


def _scores(seed: int, rows: int, cols: int, ties: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=generator)
    if ties:  # zeros and repeated values, as in already-pruned or quantized weights
        scores = torch.round(scores * 2) / 2
        scores[:, ::3] = 0
    return scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0", (0, 0)), ("unstructured", (0, 0)), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1:4 ", (1, 4))],
)
def test_sparsity_mask_structure_parses(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:2", "2-4", "two:four", "2:4:8"])
def test_sparsity_mask_structure_refuses_bad_forms(text):
    with pytest.raises(ValueError, match=r"mask_structure must be '0:0' \(unstructured\) or 'N:M' with 0 < N < M"):
        parse_mask_structure(text)


@FAST
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16)]),
    ties=st.booleans(),
)
def test_sparsity_nm_mask_keeps_exactly_n_of_every_m_along_inputs(seed, rows, groups, nm, ties):
    keep_n, group_m = nm
    scores = _scores(seed, rows, groups * group_m, ties)
    kept = nm_kept_mask(scores, keep_n, group_m)
    counts = kept.reshape(rows, groups, group_m).sum(-1)
    assert torch.all(counts == keep_n)
    # the kept ones are the best of their group
    grouped = scores.reshape(rows, groups, group_m)
    kept_grouped = kept.reshape(rows, groups, group_m)
    worst_kept = grouped.masked_fill(~kept_grouped, float("inf")).amin(-1)
    best_pruned = grouped.masked_fill(kept_grouped, float("-inf")).amax(-1)
    assert torch.all(worst_kept >= best_pruned)


@FAST
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 7),
    cols=st.integers(1, 40),
    sparsity=st.floats(0, 0.99),
    ties=st.booleans(),
)
def test_sparsity_unstructured_row_and_tensor_masks_hit_exact_counts(seed, rows, cols, sparsity, ties):
    scores = _scores(seed, rows, cols, ties)
    per_row = row_kept_mask(scores, sparsity)
    assert torch.all((~per_row).sum(1) == pruned_count(cols, sparsity))
    assert abs(pruned_count(cols, sparsity) - sparsity * cols) <= 0.5  # within one element per row
    per_tensor = tensor_kept_mask(scores, sparsity)
    assert int((~per_tensor).sum()) == pruned_count(rows * cols, sparsity)


@FAST
@given(
    seed=st.integers(0, 10_000),
    sparsities=st.lists(st.floats(0, 0.95), min_size=2, max_size=6).map(sorted),
    ties=st.booleans(),
)
def test_sparsity_magnitude_masks_are_nested_as_sparsity_grows(seed, sparsities, ties):
    weight = _scores(seed, 6, 24, ties)
    previous = None
    for sparsity in sparsities:
        kept = magnitude_kept_mask(weight, sparsity, kept=previous)
        assert int((~kept).sum()) == pruned_count(weight.numel(), sparsity)
        if previous is not None:
            assert not torch.any(kept & ~previous)  # nothing pruned comes back
        # without the previous mask the same masks come out when the weights did not change
        assert torch.equal(kept, magnitude_kept_mask(weight, sparsity)) or ties
        previous = kept
        weight = weight * kept  # pruned weights are zero, as in training


def test_sparsity_magnitude_keeps_the_largest_weights():
    weight = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]])
    kept = magnitude_kept_mask(weight, 0.5)
    assert kept.tolist() == [[False, True, False, True], [False, False, True, True]]
    assert magnitude_kept_mask(weight, 0.5, keep_n=2, group_m=4).tolist() == kept.tolist()


def test_sparsity_wanda_scores_weight_by_input_norm_per_row():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(wanda_scores(weight, norms), weight * norms)
    kept = wanda_kept_mask(weight, norms, sparsity=0.5)
    assert kept.tolist() == [[False, False, True, True], [False, True, True, False]]
    assert torch.all((~kept).sum(1) == 2)


@FAST
@given(seed=st.integers(0, 10_000), nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]))
def test_sparsity_wanda_nm_mask_keeps_n_per_group(seed, nm):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, 32, generator=generator)
    norms = torch.rand(32, generator=generator)
    kept = wanda_kept_mask(weight, norms, keep_n=nm[0], group_m=nm[1])
    assert torch.all(kept.reshape(5, -1, nm[1]).sum(-1) == nm[0])


def test_sparsity_column_norms_skip_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    accumulator = ColumnNormAccumulator(torch.zeros(8))
    accumulator.update(x, mask)
    kept = x.reshape(-1, 8)[mask.reshape(-1).bool()]
    assert accumulator.tokens == 8
    torch.testing.assert_close(accumulator.norms, kept.norm(dim=0))
