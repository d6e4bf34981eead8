"""Wanda: prune by weight magnitude times input activation norm, no weight update.

Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv 2306.11695, Eq. 1: the score of weight W_ij is S_ij = |W_ij| · ‖X_j‖₂, where X_j is input
feature j over all calibration tokens (``W: [rows, cols]``, ``X: [tokens, cols]``). Weights are
compared within each output row (§3, "per output"), or within each group of M columns for N:M.
"""

from __future__ import annotations

import attrs
import torch

from llmc.statistics import real_tokens
from llmc_sparsity.masks_nm import nm_kept_mask, row_kept_mask

__all__ = ["ColumnNormAccumulator", "wanda_kept_mask", "wanda_scores"]


@attrs.define
class ColumnNormAccumulator:
    """Running Σ_t x_tj² per input column j of one Linear (``sum_sq: [cols]``, float32); an
    ``llmc.statistics.Statistic``."""

    sum_sq: torch.Tensor
    tokens: int = 0

    @classmethod
    def for_linear(cls, module: torch.nn.Linear) -> ColumnNormAccumulator:
        return cls(torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device))

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold one batch of inputs (``[..., cols]``) in; padded tokens are skipped."""
        x = real_tokens(x, mask)  # [tokens, cols]
        if x.shape[0] == 0:
            return
        self.sum_sq += x.float().square().sum(dim=0)
        self.tokens += x.shape[0]

    def merge(self, other: ColumnNormAccumulator) -> None:
        """Fold in the sums of the same input gathered elsewhere (another rank or data shard)."""
        self.sum_sq += other.sum_sq.to(self.sum_sq.device)
        self.tokens += other.tokens

    def shard_sums(self) -> list[torch.Tensor]:
        return [self.sum_sq]

    def finalize(self) -> torch.Tensor:
        return self.norms

    @property
    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input column j."""
        return self.sum_sq.sqrt()


def wanda_scores(W: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂ (``W: [rows, cols]``, ``column_norms: [cols]``), float32."""
    return W.float().abs() * column_norms.float()[None, :]


def wanda_kept_mask(
    W: torch.Tensor,
    column_norms: torch.Tensor,
    *,
    sparsity: float = 0.5,
    keep_n: int = 0,
    group_m: int = 0,
) -> torch.Tensor:
    """Kept mask: per row, ``pruned_count(cols, sparsity)`` lowest scores pruned; or N:M."""
    scores = wanda_scores(W, column_norms)
    if group_m:
        return nm_kept_mask(scores, keep_n, group_m)
    return row_kept_mask(scores, sparsity)
