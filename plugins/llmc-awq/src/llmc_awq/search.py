"""AWQ's grid search for one mapping: the ``α`` whose scales give the smallest output error.

For each grid point ``(α, duo)`` (``llmc_awq.scales.search_grid``)::

    s        = awq_scales(mean|x|, s_W, α, duo)                      [cols]
    W_b      ← fake_quantize(W_b · diag(s)) · diag(s)⁻¹               every quantized balance Linear
    error(α) = Σ ‖parent(sample) − parent_fp(sample)‖²                 over the sample's real tokens

``fake_quantize`` is core's round-to-nearest (``llmc.quantization.fake_quantized_weight``,
exactly the rounding ``quantize_linear_`` and the checkpoint use), and dividing the quantized
weight by ``s`` instead of the input is the folded computation ``Q(W s)(x / s)`` without
touching the parent's inputs. The balance weights are put back after the search (their storage
is never written to); only one grid point's rounded weights and the parent's bounded sample are
held besides them.

Under torchrun each rank runs the grid on the sample of its own tokens, and the squared errors
(and the reference energy) are summed over the ranks in float64 before ``α`` is chosen, so all
ranks choose the same one: the search is shared out by tokens.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingType

import attrs
import torch

from llmc.distributed import sum_in_float64_
from llmc.quantization import QuantizationScheme, fake_quantized_weight
from llmc.statistics import real_tokens
from llmc_awq.capture import ParentSample, computing_in
from llmc_awq.scales import awq_scales, search_grid, weight_means

__all__ = ["SearchResult", "chunk_size", "search_scales"]


@attrs.frozen
class SearchResult:
    """The chosen scales and what the search saw: ``identity_error`` is plain rounding's
    (``s = 1``), both errors relative to ``‖parent_fp(sample)‖²``."""

    scales: torch.Tensor
    alpha: float
    duo: bool
    identity_error: float
    best_error: float
    errors: tuple[float, ...]
    held_bytes: int = 0  # the sample, its reference outputs and one grid point's rounded weights


def chunk_size(weight: torch.Tensor, scheme: QuantizationScheme) -> int:
    """How many weights one quantization scale covers along a row (``weight_means``' chunk)."""
    args = scheme.weights
    if args.strategy == "group":
        return args.group_size
    if args.strategy == "channel":
        return weight.shape[1]
    return weight.numel()


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


@torch.no_grad()
def _run(
    parent: torch.nn.Module, sample: ParentSample, device: torch.device, compute_dtype: torch.dtype | None
) -> list[torch.Tensor]:
    outputs = []
    try:
        with computing_in(compute_dtype, device):  # one context per run: the weights change between runs
            for args, kwargs, mask in sample.calls:
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                y = _first(parent(*args, **kwargs))
                outputs.append(real_tokens(y, mask).float())  # [tokens, features]
    finally:
        torch.clear_autocast_cache()
    return outputs


@torch.no_grad()
def search_scales(
    parent: torch.nn.Module,
    sample: ParentSample,
    x_mean: torch.Tensor,
    quantized: MappingType[str, tuple[torch.nn.Linear, QuantizationScheme]],
    *,
    n_grid: int,
    duo_scaling: bool | str,
    compute_dtype: torch.dtype | None = None,
) -> SearchResult:
    """Search ``α`` for one mapping (see the module docstring); the model is left as it was.

    ``quantized``: the balance Linears the following quantizer will round, with their
    schemes; ``x_mean``: mean ``|x|`` of the group's input per channel; ``compute_dtype``: the
    pipeline's autocast dtype, under which the parent runs as it did in the calibration pass.
    """
    device = next(iter(quantized.values()))[0].weight.device
    reference = _run(parent, sample, device, compute_dtype)
    energy = sum(float(y.double().square().sum()) for y in reference)
    # the weights' own storage, never written to: each grid point installs new tensors
    originals = {name: module.weight.data for name, (module, _) in quantized.items()}
    w_mean = None
    if duo_scaling:
        w_mean = weight_means(
            [originals[n] for n in quantized], [chunk_size(originals[n], s) for n, (_, s) in quantized.items()]
        ).to(device)
    x_mean = x_mean.to(device)
    grid = list(search_grid(n_grid, duo_scaling))
    squared_errors = []
    try:
        for alpha, duo in grid:
            s = awq_scales(x_mean, w_mean, alpha, duo)  # [cols]
            for name, (module, scheme) in quantized.items():
                W = originals[name]
                scaled = (W.float() * s).to(W.dtype)
                module.weight.data = (fake_quantized_weight(scaled, scheme).float() / s).to(W.dtype)
            squared_errors.append(sum(
                float((y - ref).double().square().sum()) for y, ref in zip(_run(parent, sample, device, compute_dtype), reference)
            ))
    finally:
        for name, (module, _) in quantized.items():
            module.weight.data = originals[name]
    totals = torch.tensor([energy, *squared_errors], dtype=torch.float64)
    sum_in_float64_(totals, "summing the AWQ search errors")
    energy = float(totals[0]) or 1.0
    errors = [float(total) / energy for total in totals[1:]]
    if not all(e == e for e in errors):  # NaN: the parent's forward broke on these weights
        raise FloatingPointError("AWQ search produced NaN output errors")
    best = min(range(len(errors)), key=errors.__getitem__)  # the first of equal errors
    alpha, duo = grid[best]
    held = sample.nbytes() + sum(y.numel() * y.element_size() for y in reference)
    held += sum(module.weight.numel() * module.weight.element_size() for module, _ in quantized.values())
    return SearchResult(
        awq_scales(x_mean, w_mean, alpha, duo), alpha, duo, errors[0], errors[best], tuple(errors), held
    )
