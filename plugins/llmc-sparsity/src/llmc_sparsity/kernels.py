"""numba kernels: SparseGPT's column sweep inside one block, with N:M selection on the fly.

Inside a block the rows of W are independent (each row's errors only move that row's later
columns), so the sweep runs one row per thread with ``prange``, reading ``W1[r, :]`` and
``U1[i, :]`` contiguously. Only pruned weights carry an error, so kept columns cost nothing.
Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["mark_lowest_saliency", "sweep_block"]


@numba.njit(cache=True, inline="always")
def _select_nm(w: np.ndarray, diag: np.ndarray, pruned: np.ndarray, start: int, keep_n: int, group_m: int) -> None:
    """Mark the ``group_m - keep_n`` lowest w²/d² of columns [start, start + group_m) pruned."""
    for offset in range(group_m):
        pruned[start + offset] = False
    for _ in range(group_m - keep_n):
        best = -1
        best_score = np.inf
        for offset in range(group_m):
            column = start + offset
            if pruned[column]:
                continue
            score = w[column] * w[column] / (diag[column] * diag[column])
            if score < best_score:
                best_score = score
                best = column
        if best < 0:  # only NaN scores left: prune the first free column
            for offset in range(group_m):
                if not pruned[start + offset]:
                    best = start + offset
                    break
        pruned[best] = True


@numba.njit(parallel=True, cache=True)
def sweep_block(
    W1: np.ndarray,
    U1: np.ndarray,
    pruned: np.ndarray,
    keep_n: int,
    group_m: int,
    err: np.ndarray,
    losses: np.ndarray,
) -> None:
    """SparseGPT's sequential sweep over one block of E weights, in place (arXiv 2301.00774,
    Alg. 1); the rows of all E weights are spread over the cores at once.

    ``W1: [E, rows, B]`` float32 (becomes the pruned, error-compensated weights), ``U1: [E, B,
    B]`` each weight's block of the upper Cholesky factor of its H⁻¹, ``pruned: [E, rows, B]``
    bool (given for unstructured masks; chosen here, from the updated weights, when
    ``group_m > 0``), ``err: [E, rows, B]`` the scaled errors (w − q)/U_ii for the lazy update
    of later blocks, ``losses: [E, rows]`` float64, incremented by ½ Σ (w − q)²/U_ii².

    For each column i:  e = w_i / U_ii if pruned else 0;  w_i ← w_i − e·U_ii;  w_j −= e·U_ij (j > i)
    """
    batch, rows, count = W1.shape
    diag = np.empty((batch, count), dtype=U1.dtype)
    for b in range(batch):
        for i in range(count):
            diag[b, i] = U1[b, i, i]
    for t in numba.prange(batch * rows):
        b = t // rows
        r = t - b * rows
        w = W1[b, r]
        row_pruned = pruned[b, r]
        row_err = err[b, r]
        factor = U1[b]
        row_diag = diag[b]
        loss = 0.0
        for i in range(count):
            if group_m > 0 and i % group_m == 0:
                _select_nm(w, row_diag, row_pruned, i, keep_n, group_m)
            if row_pruned[i]:
                e = w[i] / row_diag[i]
                loss += e * e
                w[i] = 0.0
                row_err[i] = e
                for j in range(i + 1, count):
                    w[j] -= e * factor[i, j]
            else:
                row_err[i] = 0.0
        losses[b, r] += 0.5 * loss


@numba.njit(cache=True)
def mark_lowest_saliency(W1: np.ndarray, U1: np.ndarray, count: int, pruned: np.ndarray) -> None:
    """Mark exactly ``count`` weights of the block with the lowest w²/U_ii² as pruned.

    ``W1: [rows, B]``, ``pruned: [rows, B]`` bool (overwritten). Ties at the threshold are
    broken by position (row-major), so the count is exact and the choice deterministic.
    """
    rows, width = W1.shape
    size = rows * width
    saliency = np.empty(size, dtype=np.float32)
    for r in range(rows):
        for i in range(width):
            d = U1[i, i]
            saliency[r * width + i] = W1[r, i] * W1[r, i] / (d * d)
    flat = pruned.reshape(size)
    flat[:] = False
    if count <= 0:
        return
    if count >= size:
        flat[:] = True
        return
    threshold = np.partition(saliency.copy(), count - 1)[count - 1]
    marked = 0
    for index in range(size):  # strictly below the threshold: all pruned
        if saliency[index] < threshold:
            flat[index] = True
            marked += 1
    for index in range(size):  # at the threshold: as many as the count still needs
        if marked >= count:
            break
        if saliency[index] == threshold:
            flat[index] = True
            marked += 1
