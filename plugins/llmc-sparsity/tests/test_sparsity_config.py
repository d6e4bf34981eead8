"""The checkpoint's sparsity record, read from the masks."""

from __future__ import annotations

import pytest
import torch

from llmc.masks import set_sparsity_mask_
from llmc_sparsity.config import checkpoint_sparsity_config, mask_structure_of
from llmc_sparsity.masks_nm import nm_kept_mask, tensor_kept_mask


def _scores(rows=8, cols=32, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("keep_n", "group_m"), [(2, 4), (1, 4), (3, 4), (4, 8), (8, 16)])
def test_sparsity_structure_is_read_from_nm_masks(keep_n, group_m):
    found = mask_structure_of(nm_kept_mask(_scores(), keep_n, group_m))
    assert found is not None and found[0] / found[1] == keep_n / group_m
    assert found[1] <= group_m  # 4:8 may also be 2:4 when every half-group keeps two


def test_sparsity_structure_of_unstructured_mask_is_none():
    assert mask_structure_of(tensor_kept_mask(_scores(64, 256), 0.5)) is None
    assert mask_structure_of(torch.ones(4, 8, dtype=torch.bool)) is None


def test_sparsity_config_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False), torch.nn.Linear(8, 32, bias=False), torch.nn.Linear(32, 4))
    assert checkpoint_sparsity_config(model) is None
    set_sparsity_mask_(model[0], nm_kept_mask(_scores(8, 32), 2, 4))
    config = checkpoint_sparsity_config(model)
    total = 32 * 8 + 8 * 32 + 32 * 4 + 4
    assert config == {
        "format": "dense", "global_sparsity": round(128 / total, 6), "sparsity_structure": "2:4",
        "targets": None, "ignore": ["1", "2"],
    }
    set_sparsity_mask_(model[1], tensor_kept_mask(_scores(32, 8, seed=1), 0.25))
    config = checkpoint_sparsity_config(model)
    assert config["sparsity_structure"] == "unstructured"  # mixed structures
    assert config["global_sparsity"] == round((128 + 64) / total, 6) and config["ignore"] == ["2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"true_sequential": 1}, r"'true_sequential' must be true or false \(got 1\)"),
        ({"dampening_frac": -0.1}, r"'dampening_frac' must be a number >= 0 \(got -0.1\)"),
        ({"sparsity": 1.5}, r"'sparsity' must be a number in \[0, 1\) \(got 1.5\)"),
    ],
    ids=["bool", "damping", "sparsity"],
)
def test_sparsegpt_parameters_are_argument_errors_from_python(kwargs, message):
    from llmc.errors import ArgumentError
    from llmc_sparsity import SparseGPTModifier

    with pytest.raises(ArgumentError, match=message):
        SparseGPTModifier(**kwargs)
