"""Distillation losses between a student's and a teacher's outputs: pure tensor math.

Every function takes ``student`` and ``teacher`` of the same shape ``[..., features]`` (logits:
features = vocabulary; hidden states: features = hidden size) and an optional ``mask`` of the
leading shape (``[batch, seq]``, 1 = a real token, 0 = padding), and returns a scalar averaged
over the real tokens. Each is 0 when ``student`` equals ``teacher`` and grows as they part;
gradients flow into ``student`` only when ``teacher`` was computed without them (the caller's
``no_grad``). Nothing here knows of modules, hooks or recipes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COMPARISONS", "cosine_distance", "kl_divergence", "mse", "square_head"]

EPS = 1e-12


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token: [...]`` over the positions ``mask`` keeps (all when None)."""
    if mask is None:
        return per_token.mean()
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)


def kl_divergence(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft-target distillation (Hinton, Vinyals, Dean 2015, arXiv 1503.02531, eq. 2 and §2):

        L = τ² · KL(softmax(z_t / τ) ‖ softmax(z_s / τ))     per token, summed over the vocabulary

    ``student``, ``teacher``: logits ``[batch, seq, vocab]``. τ² keeps the gradients' scale
    independent of the temperature. Computed in float32 from log-probabilities.
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)  # [B, S, V]
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)  # [B, S, V]
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [B, S]
    return temperature**2 * _token_mean(per_token, mask)


def mse(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error ``mean((f_s − f_t)²)`` over real tokens and features."""
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)  # [B, S]
    return _token_mean(per_token, mask)


def square_head(
    student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SquareHead feature distillation (Kurtic et al. 2023, arXiv 2310.06927, eq. 1):

        L = MSE(f_s, f_t) / MSE(f_t, 0)

    for one layer's outputs ``f: [batch, seq, hidden]``: the error normalised by the teacher's
    own energy, so layers whose activations differ in scale by orders of magnitude weigh alike.
    """
    return mse(student, teacher, mask=mask) / mse(teacher, torch.zeros_like(teacher), mask=mask).clamp_min(EPS)


def cosine_distance(
    student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 − cos(f_s, f_t)`` along the feature dimension, per token: 0 when they point alike."""
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)  # [B, S]
    return _token_mean(per_token, mask)


# The recipe's ``comparison`` names; ``cosine_similarity`` is minimised as a distance.
COMPARISONS = {
    "kl_divergence": kl_divergence,
    "square_head": square_head,
    "cosine_similarity": cosine_distance,
    "mse": mse,
}
