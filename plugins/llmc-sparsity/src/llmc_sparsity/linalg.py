"""U = upper Cholesky factor of (H + λI)⁻¹ with one factorisation and one triangular inverse.

Same contract (damping retry, error text) as ``llmc.hessian.inverse_cholesky_upper``, which
computes chol → ``cholesky_inverse`` → chol again: about 4n³/3 flops, and ``torch.cholesky_inverse``
is slow on CPU (11 s of the 15 s for n = 5632 on this 2-core machine). Here, with J the
reversal permutation and P = J H J::

    P = L Lᵀ (L lower)   ⇒   H = (J L J)(J L J)ᵀ = R Rᵀ, R = J L J upper
                         ⇒   H⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U  with  U = R⁻¹ = J L⁻¹ J  (upper, U_ii > 0)

so U costs one Cholesky and one triangular inverse (2n³/3 flops), the inverse computed by
recursive halving into matrix products:  [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]].
To move into core (``llmc.hessian``) so GPTQ gets it too; until then SparseGPT uses this one.
"""

from __future__ import annotations

import logging

import torch

from llmc.errors import CalibrationError

__all__ = ["inverse_cholesky_upper", "lower_triangular_inverse"]

logger = logging.getLogger("llmc.hessian")

_LEAF = 256


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L⁻¹ for lower-triangular ``L: [n, n]`` (non-zero diagonal), by recursive halving."""
    n = L.shape[0]
    if n <= _LEAF:
        identity = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, identity, upper=False)
    half = n // 2
    top = lower_triangular_inverse(L[:half, :half])  # A⁻¹  [h, h]
    bottom = lower_triangular_inverse(L[half:, half:])  # C⁻¹  [n−h, n−h]
    out = torch.zeros_like(L)
    out[:half, :half] = top
    out[half:, half:] = bottom
    out[half:, :half] = -(bottom @ (L[half:, :half] @ top))  # −C⁻¹ B A⁻¹
    return out


def inverse_cholesky_upper(
    H: torch.Tensor,
    dampening_frac: float,
    *,
    module_name: str,
    max_attempts: int = 8,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = frac · mean(diag H).

    When H + λI is not positive definite the damping is doubled and the factorisation retried
    (logged). Returns U and the damping fraction used; ``H`` is not changed.
    """
    mean_diagonal = torch.mean(torch.diag(H)).item()
    reversed_H = H.flip(0, 1)  # J H J  [n, n]
    diagonal = torch.arange(H.shape[0], device=H.device)
    frac = dampening_frac
    for attempt in range(max_attempts):
        damped = reversed_H.clone()
        damped[diagonal, diagonal] += frac * mean_diagonal
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            upper = lower_triangular_inverse(lower).flip(0, 1)  # J L⁻¹ J
            if torch.isfinite(upper).all():
                if attempt:
                    logger.warning(
                        "Hessian of %s needed damping %.4g (asked %.4g) to be positive definite",
                        module_name, frac, dampening_frac,
                    )
                return upper, frac
        frac *= 2.0
    raise CalibrationError(
        f"Hessian of {module_name} is not positive definite after damping {dampening_frac:g} → "
        f"{frac / 2:g}; add calibration samples or raise dampening_frac",
        module=module_name,
    )
