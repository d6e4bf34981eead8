"""The scale formulas, the search grid, and the search against an exhaustive one on a tiny case."""

from __future__ import annotations

import copy

import pytest
import torch

from llmc.quantization import preset_scheme, quantize_linear_, scheme_from_config_dict
from llmc.testing import correlated_inputs
from llmc_awq import awq_scales, search_grid, search_scales, smoothquant_scales, weight_means
from llmc_awq.capture import AbsMax, MeanAbs, ParentSample


@pytest.mark.parametrize(
    ("duo", "points", "first"),
    [(True, 20, (0.0, False)), (False, 20, (0.0, False)), ("both", 20, (0.0, False))],
    ids=["duo", "activations-only", "both"],
)
def test_search_grid_spans_alpha_and_starts_at_plain_rounding(duo, points, first):
    grid = search_grid(20, duo)
    assert len(grid) == points and grid[0] == first
    assert {alpha for alpha, _ in grid} >= {0.0, 1.0}
    if duo is True:
        assert all(d for _, d in grid[1:])
    if duo == "both":
        assert sum(d for _, d in grid) == 10


def test_awq_scales_are_normalised_powers_of_the_activation_means():
    x_mean = torch.tensor([0.1, 1.0, 4.0, 0.0])
    s = awq_scales(x_mean, None, 0.5, duo=False)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    ratio = (s[2] / s[1]).item()
    assert ratio == pytest.approx(2.0, rel=1e-5)  # sqrt(4 / 1)
    assert torch.equal(awq_scales(x_mean[:3], None, 0.0, duo=False), torch.ones(3))
    w_mean = torch.tensor([1.0, 1.0, 0.25, 1.0])
    duo = awq_scales(x_mean, w_mean, 0.5, duo=True)
    assert (duo[2] / duo[1]).item() == pytest.approx(2.0 * (1.0 + 1e-4) / (0.5 + 1e-4), rel=1e-4)


def test_weight_means_normalise_per_group():
    W = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 1.0, 1.0]])
    got = weight_means([W], [2])
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (0.5 + 1.0) / 2, (1.0 + 1.0) / 2])
    assert torch.allclose(got, expected, atol=1e-5)


def test_smoothquant_scales_follow_eq4():
    act = torch.tensor([8.0, 1.0, 0.0])
    w = torch.tensor([0.5, 2.0, 1.0])
    s = smoothquant_scales(act, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([(8 / 0.5) ** 0.5, (1 / 2.0) ** 0.5]))
    assert s[2] == 1.0  # a channel that never activated keeps its scale


@pytest.mark.parametrize("scheme_name", ["W4A16_ASYM", "W3-group32"])
def test_search_equals_an_exhaustive_search_of_the_folded_model(scheme_name):
    """The oracle folds each grid point's scales into copies of the Linears and quantizes them
    with core's quantize_linear_ (what the checkpoint will hold), then measures the output."""
    if scheme_name == "W3-group32":
        scheme = scheme_from_config_dict(
            {"targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group",
                                                "group_size": 32}}
        )
    else:
        scheme = preset_scheme(scheme_name, ["Linear"])
    torch.manual_seed(0)
    x = correlated_inputs(256, 128, seed=1)
    x[:, :4] *= 20.0  # a few salient channels, as AWQ expects of real activations
    linear = torch.nn.Linear(128, 64, bias=False)
    sample = ParentSample(max_tokens=None, device=None)
    sample.hook(lambda: None)(linear, (x,), {})
    statistic = MeanAbs()
    statistic.update(x)
    result = search_scales(
        linear, sample, statistic.finalize(), {"l": (linear, scheme)}, n_grid=8, duo_scaling=True
    )
    reference = linear(x).detach()
    exhaustive = []
    for alpha, duo in search_grid(8, True):
        s = awq_scales(statistic.finalize(), weight_means([linear.weight.detach()], [scheme.weights.group_size]), alpha, duo)
        folded = copy.deepcopy(linear)
        with torch.no_grad():
            folded.weight.mul_(s)
        quantize_linear_(folded, scheme)
        error = float((folded(x / s).detach() - reference).double().square().sum() / reference.double().square().sum())
        exhaustive.append(error)
    best = min(range(len(exhaustive)), key=exhaustive.__getitem__)
    assert result.alpha == search_grid(8, True)[best][0]
    assert result.best_error == pytest.approx(exhaustive[best], rel=1e-3)
    assert result.identity_error == pytest.approx(exhaustive[0], rel=1e-3)
    assert result.best_error <= result.identity_error  # plain rounding is a grid point
    if scheme_name == "W4A16_ASYM":
        assert result.best_error < 0.9 * result.identity_error  # the salient channels make AWQ pay off
    assert torch.equal(linear(x).detach(), reference)  # the search put the weights back


@pytest.mark.parametrize("kind", [MeanAbs, AbsMax], ids=["mean-abs", "abs-max"])
def test_statistics_merge_like_one_pass_and_skip_padding(kind):
    from llmc.statistics import Statistic

    x = correlated_inputs(64, 16, seed=2).reshape(2, 32, 16)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    x[1, 20:] = 1e6  # padded positions: must not count
    whole, first, second = kind(), kind(), kind()
    whole.update(x, mask)
    first.update(x[:1], mask[:1])
    second.update(x[1:], mask[1:])
    first.merge(second)
    assert isinstance(whole, Statistic) and whole.tokens == first.tokens == 52
    assert torch.allclose(whole.finalize(), first.finalize())
    assert float(whole.finalize().max()) < 1e5
