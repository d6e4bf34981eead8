"""Second-order statistics of Linear inputs, shared by GPTQ and SparseGPT.

Both solve a layer-wise reconstruction problem, min ‖XW − XŴ‖², whose curvature is the Hessian
H = 2/N Σ x xᵀ over the N calibration tokens x reaching a Linear (GPTQ, arXiv 2210.17323, §3;
SparseGPT, arXiv 2301.00774, §3). H is accumulated in fp32 on the layer's device with one BLAS
product per batch, as a running mean so its scale does not depend on N.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError

__all__ = [
    "HessianAccumulator",
    "attach_hessian_hooks",
    "inverse_cholesky_upper",
    "zero_dead_columns_",
]

logger = logging.getLogger("llmc.hessian")


@attrs.define
class HessianAccumulator:
    """Running H = 2/N Σ x xᵀ for one Linear (``H: [in_features, in_features]``, fp32)."""

    H: torch.Tensor
    tokens: int = 0

    @classmethod
    def for_linear(cls, module: torch.nn.Linear) -> HessianAccumulator:
        columns = module.in_features
        return cls(torch.zeros(columns, columns, dtype=torch.float32, device=module.weight.device))

    def add_(self, inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Fold one batch of inputs (``[..., in_features]``) in; padded tokens are skipped."""
        columns = self.H.shape[0]
        x = inputs.reshape(-1, columns)  # [tokens, cols]
        if token_mask is not None and token_mask.numel() == x.shape[0]:
            x = x[token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
        count = x.shape[0]
        if count == 0:
            return
        x = x.to(torch.float32)
        total = self.tokens + count
        self.H.mul_(self.tokens / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)  # H += 2/total · xᵀx
        self.tokens = total


def attach_hessian_hooks(
    modules: Mapping[str, torch.nn.Linear], context: RunContext
) -> tuple[dict[str, HessianAccumulator], Callable[[], None]]:
    """Start accumulating H for each module; returns the accumulators and a remover."""
    accumulators = {name: HessianAccumulator.for_linear(module) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():
        accumulator = accumulators[name]

        def hook(_: torch.nn.Module, args: tuple, accumulator: HessianAccumulator = accumulator) -> None:
            accumulator.add_(args[0].detach(), context.attention_mask)

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return accumulators, remove


def zero_dead_columns_(H: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Inputs that were always zero carry no information: fix their weights at 0, H_ii at 1.

    ``H: [cols, cols]``, ``W: [rows, cols]`` (both changed in place). Returns the dead mask.
    """
    dead = torch.diag(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    return dead


def inverse_cholesky_upper(
    H: torch.Tensor,
    dampening_frac: float,
    *,
    module_name: str,
    max_attempts: int = 8,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = frac · mean(diag H).

    When H + λI is not positive definite (too few samples for the width, collinear inputs), the
    damping is doubled and the factorisation retried, instead of falling back to rounding; the
    final damping is logged. Returns U and the damping fraction used. ``H`` is not changed.
    """
    mean_diagonal = torch.mean(torch.diag(H)).item()
    identity = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    frac = dampening_frac
    for attempt in range(max_attempts):
        damped = H + (frac * mean_diagonal) * identity
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
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
