"""llmc-distill: knowledge distillation for llmc, while ``llmc train`` fine-tunes.

Recipes name the modifier (``OutputDistillationModifier: {comparison: kl_divergence}``) and the
run names the teacher (``distill_teacher="self"``, a path or a model). The losses are usable on
their own: ``kl_divergence``, ``square_head``, ``mse`` and ``cosine_distance`` in
``llmc_distill.losses``.
"""

from __future__ import annotations

from llmc_distill.losses import COMPARISONS, cosine_distance, kl_divergence, mse, square_head
from llmc_distill.modifier import DistillationRun, OutputDistillationModifier

__all__ = [
    "COMPARISONS",
    "DistillationRun",
    "OutputDistillationModifier",
    "cosine_distance",
    "kl_divergence",
    "mse",
    "square_head",
]
