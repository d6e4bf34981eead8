"""Second-order statistics of Linear inputs, shared by GPTQ and SparseGPT.

Both solve a layer-wise reconstruction problem, min ‖XW − XŴ‖², whose curvature is the Hessian
H = 2/N Σ x xᵀ over the N calibration tokens x reaching a Linear (GPTQ, arXiv 2210.17323, §3;
SparseGPT, arXiv 2301.00774, §3). H is accumulated in fp32 on the layer's device with one BLAS
product per batch, as a running mean so its scale does not depend on N.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import torch

from llmc.errors import CalibrationError
from llmc.statistics import real_tokens

__all__ = [
    "HessianAccumulator",
    "inverse_cholesky_upper",
    "inverse_cholesky_upper_batch",
    "lower_triangular_inverse",
    "lower_triangular_inverse_",
    "zero_dead_columns_",
]

logger = logging.getLogger("llmc.hessian")


@attrs.define
class HessianAccumulator:
    """Running H = 2/N Σ x xᵀ for one Linear input (``H: [in_features, in_features]``, fp32).

    H is symmetric, so only the blocks on and above the diagonal of ``S = Σ x xᵀ`` are
    accumulated (one ``addmm`` per block row of ``block`` columns: 55-65 % of the full
    product's arithmetic, measured 35-40 % faster on CPU); ``H`` mirrors them. For wide inputs
    this product costs more than the Linear's own forward (tokens · cols² against
    tokens · cols · rows), so the saving is worth the bookkeeping. ``H`` is computed on first
    read and cached; adding tokens afterwards clears the cache.
    """

    S: torch.Tensor  # [cols, cols]; blocks on and above the diagonal are valid (until mirrored)
    block: int = 512
    tokens: int = 0
    _mirrored: bool = attrs.field(default=False, repr=False)
    _released: bool = attrs.field(default=False, repr=False)
    # passes over the layer that read this Hessian besides the one gathering it
    # (``llmc.statistics``: SparseGPT and GPTQ of one stage share it); release waits for all
    readers: int = attrs.field(default=0, repr=False)

    @property
    def share_key(self) -> tuple:
        """Two accumulators of one input with equal keys gather equal sums."""
        return ("hessian", tuple(self.S.shape), self.block, str(self.S.device))

    @classmethod
    def for_linear(cls, module: torch.nn.Linear) -> HessianAccumulator:
        columns = module.in_features
        block = min(512, max(64, columns // 8 // 64 * 64))
        return cls(torch.zeros(columns, columns, dtype=torch.float32, device=module.weight.device), block)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold one batch of inputs (``[..., in_features]``) in; padded tokens are skipped."""
        x = real_tokens(x, mask)  # [tokens, cols]
        if x.shape[0] == 0:
            return
        self._to_sums()
        x = x.to(torch.float32)
        columns = self.S.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under any autocast
            for start in range(0, columns, self.block):
                stop = min(start + self.block, columns)
                self.S[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])  # block row, upper part
        self.tokens += x.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Fold in the sums of the same input gathered elsewhere (another rank or data shard)."""
        if other.S.shape != self.S.shape:
            raise CalibrationError(
                f"cannot merge a Hessian of shape {list(other.S.shape)} into one of shape "
                f"{list(self.S.shape)}"
            )
        if not other.tokens:
            return
        self._to_sums()
        sums = other.S * (other.tokens / 2.0) if other._mirrored else other.S  # upper part valid
        self.S.add_(sums.to(self.S.device))
        self.tokens += other.tokens

    def shard_sums(self) -> list[torch.Tensor]:
        """The block rows of ``S`` on and above the diagonal, as sums (views): the part that is
        accumulated, so ranks exchange 55-65 % of the matrix (the rest is mirrored from it
        when ``H`` is read)."""
        self._to_sums()
        columns = self.S.shape[0]
        return [self.S[start:min(start + self.block, columns), start:] for start in range(0, columns, self.block)]

    def finalize(self) -> torch.Tensor:
        """H, what a solver factors."""
        return self.H

    def release(self) -> None:
        """Free the matrix once a solver has taken what it needs from it (its factor): for a
        wide input the largest tensor of the solve besides the factor. ``tokens`` stays; reading,
        updating or merging afterwards is refused. A shared Hessian is freed by its last reader."""
        if self.readers:
            self.readers -= 1
            return
        self.S = self.S.new_empty((0, 0))
        self._released = True

    def _check_held(self) -> None:
        if self._released:
            raise CalibrationError("this Hessian was released after its solve and cannot be read or updated")

    def _to_sums(self) -> None:
        self._check_held()
        if self._mirrored:  # H was read: back to sums (the mirrored lower part is rewritten later)
            self.S.mul_(self.tokens / 2.0)
            self._mirrored = False

    @property
    def H(self) -> torch.Tensor:
        """2/N S with its lower part mirrored from the upper, computed in the storage of S.

        No second [cols, cols] matrix: for a 5632-wide input that is 127 MB less at the peak
        of a solve. The same tensor is returned until more tokens are added.
        """
        self._check_held()
        if not self._mirrored:
            columns = self.S.shape[0]
            for start in range(0, columns, self.block):
                stop = min(start + self.block, columns)
                self.S[stop:, start:stop].copy_(self.S[start:stop, stop:].T)  # disjoint blocks
            if self.tokens:
                self.S.mul_(2.0 / self.tokens)
            self._mirrored = True
        return self.S


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
    """L⁻¹ for lower-triangular ``L: [..., n, n]`` (non-zero diagonal), by recursive halving.

    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]: the work becomes matrix products (BLAS),
    which on CPU beats both ``cholesky_inverse`` and one big triangular solve. A batch of
    matrices is inverted with batched products, one call per step for all of them. ``L`` is not
    changed (``lower_triangular_inverse_`` inverts in its storage).
    """
    return lower_triangular_inverse_(L.clone())


# rows of C⁻¹ multiplied at a time when the corner block is rewritten in place
_CORNER_ROWS = 1024


def lower_triangular_inverse_(L: torch.Tensor) -> torch.Tensor:
    """``lower_triangular_inverse`` in the storage of ``L`` (returned), with its strict upper
    part zero: besides L itself it holds one block of a quarter of L and a few rows, where a
    copy would hold a second L and half of one again (for a 14336-wide Hessian, 0.2 GB instead
    of 1.6 GB). The products are the same, so the result is bit for bit the copying one's."""
    n = L.shape[-1]
    if n <= _TRIANGULAR_LEAF:
        identity = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, identity.expand_as(L), upper=False))
        return L
    half = n // 2
    top = lower_triangular_inverse_(L[..., :half, :half])  # A⁻¹
    bottom = lower_triangular_inverse_(L[..., half:, half:])  # C⁻¹
    corner = L[..., half:, :half]
    product = corner @ top  # B A⁻¹, before B is overwritten
    for start in range(0, n - half, _CORNER_ROWS):  # −C⁻¹ B A⁻¹, by rows of C⁻¹
        stop = min(start + _CORNER_ROWS, n - half)
        corner[..., start:stop, :] = -(bottom[..., start:stop, :] @ product)
    return L


def _reverse_(matrices: torch.Tensor) -> torch.Tensor:
    """``J M J`` (rows and columns reversed) of each contiguous ``[n, n]`` matrix, in place:
    the matrix read backwards as one flat array, swapped from both ends piece by piece."""
    for matrix in matrices.view(-1, *matrices.shape[-2:]):
        flat = matrix.view(-1)
        total = flat.numel()
        for start in range(0, total // 2, _PIECE):
            stop = min(start + _PIECE, total // 2)
            low, high = flat[start:stop], flat[total - stop:total - start]
            saved = low.clone()
            low.copy_(high.flip(0))
            high.copy_(saved.flip(0))
    return matrices


def _transpose_(matrices: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Each contiguous square ``[n, n]`` matrix transposed in its own storage, block by block."""
    n = matrices.shape[-1]
    for matrix in matrices.view(-1, n, n):
        for i in range(0, n, block):
            diagonal = matrix[i:i + block, i:i + block]
            diagonal.copy_(diagonal.T.clone())
            for j in range(i + block, n, block):
                upper, lower = matrix[i:i + block, j:j + block], matrix[j:j + block, i:i + block]
                saved = upper.clone()
                upper.copy_(lower.T)
                lower.copy_(saved.T)
    return matrices


def _flipped_row_major_(factors: torch.Tensor) -> torch.Tensor:
    """``J X J`` of each of ``factors`` (``[E, n, n]``) as a row-major tensor, in the storage of
    ``factors`` when they are row- or column-major (LAPACK's layout, in which torch factors)."""
    if factors.is_contiguous():
        return _reverse_(factors)
    if factors.mT.is_contiguous():  # the storage holds Xᵀ row-major: reverse it, then transpose
        return _transpose_(_reverse_(factors.mT))
    return _reverse_(factors.contiguous())


_PIECE = 1 << 22


def inverse_cholesky_upper(
    H: torch.Tensor,
    dampening_frac: float,
    *,
    module_name: str,
    order: torch.Tensor | None = None,
    max_attempts: int = 8,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = frac · mean(diag H).

    One Cholesky and one triangular inverse (2n³/3 flops) instead of Cholesky → inverse →
    Cholesky. With J the reversal permutation and J H J = L Lᵀ (L lower)::

        H = R Rᵀ with R = J L J upper   ⇒   H⁻¹ = R⁻ᵀ R⁻¹ = UᵀU,   U = R⁻¹ = J L⁻¹ J

    U is upper triangular with a positive diagonal, hence *the* Cholesky factor of H⁻¹.

    ``order`` (a permutation of the columns, e.g. act-order) factors ``H[order][:, order]``
    instead; it and the reversal are applied in one gather, so H is copied once however it is
    ordered (copies of a 5632² Hessian cost as much as its Cholesky on 2 cores). A zero
    diagonal entry (an input that never fired: its row and column are zero) is taken as 1.

    When H + λI is not positive definite (too few samples for the width, collinear inputs), the
    damping is doubled and the factorisation retried, instead of falling back to rounding; the
    final damping is logged. Returns U and the damping fraction used. ``H`` is not changed.
    This is ``inverse_cholesky_upper_batch`` of one matrix.
    """
    upper, (frac,) = inverse_cholesky_upper_batch(
        [H], dampening_frac, module_names=[module_name], orders=[order], max_attempts=max_attempts
    )
    return upper[0], frac


def inverse_cholesky_upper_batch(
    hessians: Sequence[torch.Tensor],
    dampening_frac: float,
    *,
    module_names: Sequence[str],
    orders: Sequence[torch.Tensor | None] | None = None,
    max_attempts: int = 8,
    together: bool | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """``inverse_cholesky_upper`` of E Hessians of one width: ``U: [E, n, n]`` and each damping.

    ``together`` (default: on a GPU) makes the E factorisations and triangular inverses one
    batched call each: a mixture of experts solves many small Hessians, whose time one call
    per matrix spends in kernel launches on a GPU. On CPU the default is one matrix after the
    other: the batched calls there run each matrix's own LAPACK and BLAS routine (the results
    are the same bit for bit; the tests compare them) but walk all E matrices through memory at
    every step instead of keeping one in cache, which measured slower (docs/benchmarks.md).
    Damping is chosen and retried per matrix, as for one; on a GPU the batched kernels may
    round differently from one matrix's.
    """
    if together is None:
        together = hessians[0].device.type != "cpu"
    if together or len(hessians) == 1:
        return _inverse_cholesky_upper_together(hessians, dampening_frac, module_names, orders, max_attempts)
    factors = torch.empty((len(hessians), *hessians[0].shape), dtype=hessians[0].dtype, device=hessians[0].device)
    fracs = []
    for index, H in enumerate(hessians):
        order = None if orders is None else orders[index]
        upper, (frac,) = _inverse_cholesky_upper_together([H], dampening_frac, [module_names[index]], [order], max_attempts)
        factors[index] = upper[0]
        fracs.append(frac)
    return factors, fracs


def _inverse_cholesky_upper_together(
    hessians: Sequence[torch.Tensor],
    dampening_frac: float,
    module_names: Sequence[str],
    orders: Sequence[torch.Tensor | None] | None,
    max_attempts: int,
) -> tuple[torch.Tensor, list[float]]:
    """``inverse_cholesky_upper_batch`` in batched calls (see there)."""
    count = len(hessians)
    orders = list(orders) if orders is not None else [None] * count

    def reordered(index: int) -> torch.Tensor:  # J P H Pᵀ J, our own copy
        H, order = hessians[index], orders[index]
        if order is None:
            return H.flip(0, 1)
        flipped = order.to(H.device).flip(0)
        return H.index_select(0, flipped).index_select(1, flipped)

    diagonals, means = [], []
    for H, order in zip(hessians, orders):
        original = torch.diagonal(H).clone()
        original[original == 0] = 1.0
        if order is not None:
            original = original[order.to(H.device)]
        original = original.flip(0)
        diagonals.append(original)
        means.append(torch.mean(original).item())
    fracs = [dampening_frac] * count
    solved: dict[int, torch.Tensor] = {}  # index -> its U (a view into a batch of them)
    pending = list(range(count))
    for attempt in range(max_attempts):
        damped = torch.stack([reordered(i) for i in pending]) if len(pending) > 1 else reordered(pending[0])[None]
        for slot, index in enumerate(pending):
            damped[slot].diagonal().copy_(diagonals[index] + fracs[index] * means[index])
        # factored in place, in LAPACK's column-major layout (the matrices are symmetric, so
        # their transposes are them): no second [n, n] per matrix, and torch's own layout
        lower = damped.mT
        del damped
        info = torch.empty(lower.shape[:-2], dtype=torch.int32, device=lower.device)
        torch.linalg.cholesky_ex(lower, out=(lower, info))  # [pending, n, n]
        codes = info.tolist()  # one read of the E results, not one per matrix
        factored = [slot for slot, code in enumerate(codes) if code == 0]
        failed = [pending[slot] for slot, code in enumerate(codes) if code != 0]
        upper = None
        if factored:
            upper = lower_triangular_inverse_(lower if len(factored) == len(pending) else lower[factored])
        del lower
        if upper is not None:
            # One reduction instead of an elementwise mask: an inf or nan anywhere makes the
            # sum non-finite (an overflowing sum of finite values only costs a retry).
            finite = [bool(torch.isfinite(upper[position].sum())) for position in range(len(factored))]
            upper = _flipped_row_major_(upper)  # J L⁻¹ J, in place
            for position, slot in enumerate(factored):
                index = pending[slot]
                if not finite[position]:
                    failed.append(index)
                    continue
                if attempt:
                    logger.warning(
                        "Hessian of %s needed damping %.4g (asked %.4g) to be positive definite",
                        module_names[index], fracs[index], dampening_frac,
                    )
                solved[index] = upper[position]
        if not failed:
            if upper is not None and upper.shape[0] == count:  # all at the first attempt
                return upper, fracs
            return torch.stack([solved[index] for index in range(count)]), fracs
        pending = sorted(failed)
        for index in pending:
            fracs[index] *= 2.0
    index = pending[0]
    raise CalibrationError(
        f"Hessian of {module_names[index]} is not positive definite after damping {dampening_frac:g} → "
        f"{fracs[index] / 2:g}; add calibration samples or raise dampening_frac",
        module=module_names[index],
    )
