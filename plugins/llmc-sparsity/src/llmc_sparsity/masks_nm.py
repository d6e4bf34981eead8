"""Which weights to keep: masks from scores, unstructured or N:M, with exact counts.

Every function takes scores (higher = more worth keeping) and returns a bool mask shaped like
them, True where a weight is kept. Counts are exact, never thresholds, so ties (zeros, equal
magnitudes) cannot push a layer past its target:

* N:M (``keep_n`` of every ``group_m`` consecutive input columns of a row, "2:4" = 2 kept of
  every 4, 50 % sparse): exactly ``keep_n`` kept per group;
* per row: exactly ``pruned_count(cols, sparsity)`` pruned in every row;
* per tensor: exactly ``pruned_count(numel, sparsity)`` pruned in the whole tensor.

A previous mask can be passed as ``kept``: weights it pruned stay pruned (nested masks, for
gradual pruning), and count towards the target.
"""

from __future__ import annotations

import math

import torch

from llmc.errors import ArgumentError

__all__ = [
    "UNSTRUCTURED",
    "lowest_pruned_mask",
    "nm_kept_mask",
    "parse_mask_structure",
    "pruned_count",
    "row_kept_mask",
    "structure_sparsity",
    "tensor_kept_mask",
]

UNSTRUCTURED = (0, 0)


def parse_mask_structure(structure: str) -> tuple[int, int]:
    """``"N:M"`` → (N, M): N weights kept in every M consecutive input columns.

    ``"0:0"`` and ``"unstructured"`` give (0, 0). Raises ``ArgumentError`` for anything else.
    """
    text = structure.strip().lower()
    if text in ("unstructured", "0:0"):
        return UNSTRUCTURED
    parts = text.split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        keep_n, group_m = int(parts[0]), int(parts[1])
        if 0 < keep_n < group_m:
            return keep_n, group_m
    raise ArgumentError(
        f"mask_structure must be '0:0' (unstructured) or 'N:M' with 0 < N < M, N weights "
        f"kept in every M ('2:4'); got {structure!r}"
    )


def structure_sparsity(keep_n: int, group_m: int) -> float:
    """The sparsity an N:M structure implies (1 − N/M)."""
    return 1.0 - keep_n / group_m


def pruned_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights to prune for ``sparsity``: round(s·total), halves up."""
    return min(total, max(0, math.floor(sparsity * total + 0.5)))


def _protect(scores: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Scores where previously pruned weights rank below every other weight."""
    if kept is None:
        return scores
    return scores.masked_fill(~kept, float("-inf"))


def nm_kept_mask(
    scores: torch.Tensor, keep_n: int, group_m: int, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``keep_n`` best of every ``group_m`` consecutive columns in each row.

    ``scores: [rows, cols]`` with ``cols % group_m == 0``. With ``kept``, pruned weights stay
    pruned (a group that already has fewer than ``keep_n`` kept weights stays that way).
    """
    rows, cols = scores.shape
    if cols % group_m:
        raise ValueError(f"{cols} columns do not split into groups of {group_m}")
    grouped = _protect(scores, kept).reshape(rows, cols // group_m, group_m)  # [rows, groups, m]
    best = grouped.topk(keep_n, dim=-1).indices  # [rows, groups, n]
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, best, True)
    mask = mask.reshape(rows, cols)
    return mask if kept is None else mask & kept


def row_kept_mask(
    scores: torch.Tensor, sparsity: float, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Prune exactly ``pruned_count(cols, sparsity)`` weights in every row of ``[rows, cols]``."""
    rows, cols = scores.shape
    to_prune = pruned_count(cols, sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if to_prune:
        worst = _protect(scores, kept).topk(to_prune, dim=1, largest=False).indices  # [rows, k]
        mask.scatter_(1, worst, False)
    return mask if kept is None else mask & kept


def lowest_pruned_mask(scores: torch.Tensor, to_prune: int) -> torch.Tensor:
    """True for exactly the ``to_prune`` lowest scores of the whole tensor (a *pruned* mask)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if to_prune:
        pruned[scores.reshape(-1).topk(to_prune, largest=False).indices] = True
    return pruned.reshape(scores.shape)


def tensor_kept_mask(
    scores: torch.Tensor, sparsity: float, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Prune exactly ``pruned_count(numel, sparsity)`` weights of the whole tensor."""
    to_prune = pruned_count(scores.numel(), sparsity)
    mask = ~lowest_pruned_mask(_protect(scores, kept), to_prune)
    return mask if kept is None else mask & kept
