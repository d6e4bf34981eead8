"""The per-channel scales of AWQ and SmoothQuant, as pure math on tensors.

Both methods rewrite ``y = W x`` as ``y = (W diag(s)) (diag(s)⁻¹ x)`` for a positive ``s`` per
input channel, with ``diag(s)⁻¹`` folded into whatever produced ``x`` (``llmc_awq.folding``), so
the model computes the same function and only the quantization error changes. They differ in
what ``s`` is for:

* **AWQ** (Lin et al., arXiv 2306.00978, §3.2, eq. 4-5): a few input channels carry large
  activations; scaling their weight columns up before weight quantization protects them.
  ``s = s_X^α`` with ``s_X = mean|x|`` per channel, ``α ∈ [0, 1]`` searched on a grid by the
  output error of the quantized group. "duo scaling" (the reference implementations' default)
  divides by the weights' own per-channel magnitude too, ``s = s_X^α / s_W^(1−α)``, where
  ``s_W`` is the mean of ``|W|`` normalised per quantization group.
* **SmoothQuant** (Xiao et al., arXiv 2211.10438, eq. 4): activation outliers make per-token
  int8 inputs coarse; ``s_j = max|X_j|^α / max|W_j|^(1−α)`` moves part of each channel's range
  from the activation into the weights (``α``: ``smoothing_strength``).

Shapes: ``x_mean``, ``w_mean``, ``act_absmax``, ``weight_absmax``, ``s``: ``[cols]`` (one per
input channel); weights ``W: [rows, cols]``.
"""

from __future__ import annotations

import torch

__all__ = [
    "DUO_SCALING",
    "awq_scales",
    "search_grid",
    "smoothquant_scales",
    "weight_means",
]

DUO_SCALING = (True, False, "both")
_MIN_AWQ_SCALE = 1e-4
_MIN_SMOOTHQUANT_SCALE = 1e-5


def search_grid(n_grid: int, duo_scaling: bool | str) -> list[tuple[float, bool]]:
    """The ``(α, duo)`` points AWQ tries, in order.

    ``False``: ``n_grid`` values of ``α`` from 0 to 1, activation term only. ``True``: the
    identity (``α = 0`` without the weight term, i.e. plain rounding) and ``n_grid − 1`` values
    with duo scaling, so the search can never do worse than round-to-nearest on its data.
    ``"both"``: ``n_grid // 2`` values of ``α``, each with and without the weight term.
    """
    if duo_scaling == "both":
        half = max(n_grid // 2, 2)
        return [(i / (half - 1), duo) for i in range(half) for duo in (False, True)]
    if duo_scaling:
        steps = max(n_grid - 1, 2)
        return [(0.0, False)] + [(i / (steps - 1), True) for i in range(steps)]
    steps = max(n_grid, 2)
    return [(i / (steps - 1), False) for i in range(steps)]


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, duo: bool) -> torch.Tensor:
    """AWQ's ``s = s_X^α`` (or ``s_X^α / s_W^(1−α)`` with ``duo``), float32, ``[cols]``.

    Normalised so that ``max(s) · min(s) = 1`` (only ratios between channels matter; this keeps
    the folded norm weights near their original magnitude); channels whose statistic is zero or
    not finite get 1.
    """
    x_mean = x_mean.float()
    s = x_mean.pow(alpha)
    if duo:
        assert w_mean is not None, "duo scaling needs the weights' mean magnitudes"
        s = s / (w_mean.float().pow(1 - alpha) + _MIN_AWQ_SCALE)
    s = s.clamp(min=_MIN_AWQ_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def weight_means(weights: list[torch.Tensor], chunk_sizes: list[int]) -> torch.Tensor:
    """``s_W``: per input channel, the mean over every row of ``|W|`` divided by the max of its
    quantization chunk (``chunk_sizes[i]``: the group size, the row width for per-channel
    scales, or the whole matrix for one scale per tensor), float32 ``[cols]``.

    Normalising per chunk makes the term scale-free within what one quantization scale covers,
    which is what decides the rounding error of a column.
    """
    total = None
    rows = 0
    for W, chunk in zip(weights, chunk_sizes):
        w = W.detach().float().abs()
        shape = w.shape
        w = w.reshape(-1, chunk)  # [rows * cols / chunk, chunk]
        w = (w / (w.amax(dim=1, keepdim=True) + 1e-6)).reshape(shape)
        column_sums = w.sum(dim=0, dtype=torch.float64)
        total = column_sums if total is None else total + column_sums
        rows += shape[0]
    assert total is not None, "weight_means needs at least one weight"
    return (total / rows).float()


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (eq. 4), float32 ``[cols]``.

    A channel that never activated, or whose weights are all zero, gets ``s = 1`` (nothing to
    migrate); scales are at least 1e-5 so that dividing the producer by them stays finite.
    """
    a = act_absmax.float()
    w = weight_absmax.float()
    s = a.pow(alpha) / w.pow(1 - alpha)
    usable = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(usable, s, torch.ones_like(s)).clamp(min=_MIN_SMOOTHQUANT_SCALE)
