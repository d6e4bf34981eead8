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
    "attach_shared_hessian_hooks",
    "inverse_cholesky_upper",
    "lower_triangular_inverse",
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


def attach_shared_hessian_hooks(
    modules: Mapping[str, torch.nn.Linear], context: RunContext
) -> tuple[dict[str, HessianAccumulator], Callable[[], None]]:
    """Like ``attach_hessian_hooks``, but modules fed the very same tensor share one H.

    In a decoder layer q/k/v_proj read the same normed hidden states and gate/up_proj the same
    MLP input, so their Hessians are equal; accumulating each separately repeats the most
    expensive products of the calibration pass (and, downstream, the inverse). Sharing is
    decided on the first batch (a module whose input is the tensor object another module just
    received) and checked on every later batch. Shared accumulators appear under several names.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    leader_of: dict[str, str] = {}  # module → the module whose accumulator it uses
    last_input: dict[str, torch.Tensor] = {}  # leader → the tensor it accumulated last
    handles = []

    for name, module in modules.items():

        def hook(_: torch.nn.Module, args: tuple, name: str = name, module: torch.nn.Linear = module) -> None:
            x = args[0]
            leader = leader_of.get(name)
            if leader is None:  # first batch: does a module already hold this very tensor?
                leader = next((other for other, seen in last_input.items() if seen is x), name)
                leader_of[name] = leader
                accumulators[name] = (
                    HessianAccumulator.for_linear(module) if leader == name else accumulators[leader]
                )
            if leader != name:
                if last_input.get(leader) is not x:
                    raise CalibrationError(
                        f"{name} shared its input with {leader} on the first calibration batch "
                        "but not on a later one; their Hessians cannot be shared",
                        module=name,
                    )
                return
            accumulators[name].add_(x.detach(), context.attention_mask)
            last_input[name] = x  # a reference: the tensor cannot be freed and its id reused

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        last_input.clear()

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


_TRIANGULAR_LEAF = 256


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L⁻¹ for lower-triangular ``L: [n, n]`` (non-zero diagonal), by recursive halving.

    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]: the work becomes matrix products (BLAS),
    which on CPU beats both ``cholesky_inverse`` and one big triangular solve.
    """
    n = L.shape[0]
    if n <= _TRIANGULAR_LEAF:
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

    One Cholesky and one triangular inverse (2n³/3 flops) instead of Cholesky → inverse →
    Cholesky. With J the reversal permutation and J H J = L Lᵀ (L lower)::

        H = R Rᵀ with R = J L J upper   ⇒   H⁻¹ = R⁻ᵀ R⁻¹ = UᵀU,   U = R⁻¹ = J L⁻¹ J

    U is upper triangular with a positive diagonal, hence *the* Cholesky factor of H⁻¹.

    When H + λI is not positive definite (too few samples for the width, collinear inputs), the
    damping is doubled and the factorisation retried, instead of falling back to rounding; the
    final damping is logged. Returns U and the damping fraction used. ``H`` is not changed.
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
