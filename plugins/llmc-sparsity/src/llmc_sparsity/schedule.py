"""Gradual pruning schedules: how sparse a layer should be at a point of fine-tuning.

Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878, Eq. 1 (the cubic schedule
llm-compressor's ``MagnitudePruningModifier`` follows)::

    s(t) = s_f + (s_i − s_f) · (1 − (t − start) / (end − start))³      start ≤ t ≤ end

Times are in epochs (floats). Sparsity changes only at update points
start, start + update, start + 2·update, ... and at end; between them it stays where the last
point put it, so the masks a run ends with do not depend on how many steps an epoch has.
"""

from __future__ import annotations

import math

__all__ = ["cubic_sparsity", "last_update_point", "scheduled_sparsity"]


def cubic_sparsity(t: float, init_sparsity: float, final_sparsity: float, start: float, end: float) -> float:
    """s(t) of the cubic schedule, clamped to [start, end]."""
    if end <= start:
        return final_sparsity
    progress = min(1.0, max(0.0, (t - start) / (end - start)))
    return final_sparsity + (init_sparsity - final_sparsity) * (1.0 - progress) ** 3


def last_update_point(t: float, start: float, end: float, update: float) -> float | None:
    """The latest update point ≤ t (None before ``start``); ``end`` once t ≥ end."""
    eps = 1e-9  # epochs computed as step / steps_per_epoch must not miss a point by rounding
    if t + eps < start:
        return None
    if t + eps >= end:
        return end
    return start + math.floor((t - start + eps) / update) * update


def scheduled_sparsity(
    t: float, *, init_sparsity: float, final_sparsity: float, start: float, end: float, update: float
) -> tuple[float, float] | None:
    """(update point, sparsity at that point) in force at epoch ``t``, or None before start."""
    point = last_update_point(t, start, end, update)
    if point is None:
        return None
    return point, cubic_sparsity(point, init_sparsity, final_sparsity, start, end)
