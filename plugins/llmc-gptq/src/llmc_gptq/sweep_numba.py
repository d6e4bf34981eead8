"""The GPTQ column sweep inside one block, and group parameters, compiled with numba (CPU).

Same algorithm, same arithmetic and same arguments as ``sweep_torch`` (the reference; read
its docstring for the maths). The difference is the loop order: the reference walks a block
column by column, each step a handful of torch operations over all rows; here each row walks
the whole block on its own, since rows never interact inside a sweep::

    for row r in prange(E · rows):          (the rows of all E weights spread over the cores)
        for column j in [i1, i2):           (the sweep order)
            q   = round(clamp(W[r, j] / scale + zero_point))   (onto the integer or float grid)
            err = (W[r, j] - (q - zero_point) * scale) / U[j, j]
            W[r, j+1:i2] -= err * U[j, j+1:i2]    (contiguous, vectorised)
            Err[r, j - i1] = err

A row's slice of the block (``block_size`` floats) stays in L1 and ``U[i1:i2, i1:i2]`` in L2,
so the sweep runs at the speed of the arithmetic, not of Python. The update of the columns
right of the block (``W[:, i2:] -= Err @ U[i1:i2, i2:]``) is a matrix product and stays in
BLAS, in the caller. ``open_groups_numba_`` computes the min-max parameters of the groups
whose first column falls in the next block, per row, in parallel.

Every operation is done in float32 in the order the reference uses (no fast-math: no fused
multiply-add, no reassociation), so the results are bit-for-bit equal to the torch reference.
Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch

from llmc.quantization import Grid

__all__ = ["open_groups_numba_", "sweep_block_numba_"]


def _prefer_workqueue_threads() -> None:
    """Use numba's own thread pool unless the user chose a threading layer.

    numba's default ``omp`` layer loads the system libgomp next to the one bundled with torch;
    the two OpenMP pools then compete for the cores and, measured on 2 cores, MKL's Cholesky
    ran 5-10x slower after a sweep. The ``workqueue`` pool sleeps when idle. Set
    ``NUMBA_THREADING_LAYER`` to override.
    """
    from numba.np.ufunc import parallel

    if os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER != "default":
        return
    if not parallel._is_initialized:
        numba.config.THREADING_LAYER = "workqueue"


_prefer_workqueue_threads()


@numba.njit(cache=True, inline="always")
def _round_scale(scale: np.float32, significant_bits: int, min_exponent: int) -> np.float32:
    """Round a positive float32 scale to the float format it is stored in (bfloat16, float16).

    Round to nearest, ties to even, as ``tensor.to(dtype)`` does: the quantum is the value of
    the last kept bit, ``2**(max(e, min_exponent) - significant_bits + 1)`` for a leading bit
    ``2**e``; the arithmetic is exact in float64.
    """
    if significant_bits >= 24:
        return scale
    value = np.float64(scale)
    _, exponent = math.frexp(value)  # value = m * 2**exponent, 0.5 <= m < 1
    quantum_exponent = max(exponent - 1, min_exponent) - (significant_bits - 1)
    return np.float32(math.ldexp(np.rint(math.ldexp(value, -quantum_exponent)), quantum_exponent))


@numba.njit(cache=True, inline="always")
def _round_to_grid(
    value: np.float32, is_float: bool, mantissa_bits: int, min_exponent: int
) -> np.float32:
    """Round a clamped value onto its grid: an integer (``rint``, half to even), or the nearest
    value of a float format with ``mantissa_bits`` stored bits whose smallest normal number is
    ``2**min_exponent`` (FP8 E4M3: 3, -6; FP4 E2M1: 1, 0), ties to even, sign of zero kept.

    The float case is what casting to that format does after clamping (``grids.Grid.round_``):
    the quantum of a value with leading bit ``2**e`` is ``2**(max(e, min_exponent) -
    mantissa_bits)``, below the normal range the subnormal quantum; exact in float64.
    """
    if not is_float:
        return np.rint(value)
    magnitude = abs(np.float64(value))
    if magnitude == 0.0:
        return value
    _, exponent = math.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    quantum_exponent = max(exponent - 1, min_exponent) - mantissa_bits
    rounded = math.ldexp(np.rint(math.ldexp(np.float64(value), -quantum_exponent)), quantum_exponent)
    return np.float32(rounded)


@numba.njit(cache=True, inline="always")
def _qparams(
    lo: np.float32,
    hi: np.float32,
    q_min: np.float32,
    q_max: np.float32,
    symmetric: bool,
    eps: np.float32,
    significant_bits: int,
    min_exponent: int,
) -> tuple[np.float32, np.float32]:
    """Min-max (scale, zero point) of one group, as ``llmc.quantization.math`` computes them.

    ``lo <= 0 <= hi`` already. Symmetric: ``scale = max(|lo|, |hi|) / ((q_max - q_min) / 2)``;
    asymmetric: ``scale = (hi - lo) / (q_max - q_min)``, ``zero = round(clamp(q_min - lo /
    scale))``; a zero scale becomes ``eps`` (zero point 0). The scale is then rounded to its
    storage dtype, so the sweep quantizes with exactly the scale the checkpoint holds.
    """
    levels = q_max - q_min
    if symmetric:
        scale = max(-lo, hi) / (levels / np.float32(2.0))
        zero = np.float32(0.0)
    else:
        scale = (hi - lo) / levels
        if scale == np.float32(0.0):
            zero = np.float32(0.0)  # 0 / 0 in the reference, which it maps to 0
        else:
            zero = q_min - lo / scale
            zero = min(max(zero, q_min), q_max)
    if scale == np.float32(0.0):
        scale = eps
    zero = np.rint(min(max(zero, np.float32(-128.0)), np.float32(127.0)))
    return _round_scale(scale, significant_bits, min_exponent), zero


@numba.njit(cache=True, fastmath=True, inline="always")
def _min_max(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(min(values, 0), max(values, 0))``, vectorised (exact: min and max do not round)."""
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for k in range(values.shape[0]):
        lo = min(lo, values[k])
        hi = max(hi, values[k])
    return lo, hi


@numba.njit(parallel=True, cache=True)
def _open_groups(
    W: np.ndarray,  # [rows, cols] float32, sweep order
    groups: np.ndarray,  # [n] int64: the groups to open
    group_ptr: np.ndarray,  # [groups + 1] int64: CSR offsets into group_columns
    group_columns: np.ndarray,  # sweep positions of each group's columns, ascending
    kept: np.ndarray,  # [rows, cols] bool (sweep order), or [0, 0] when nothing is pruned
    scale: np.ndarray,  # [rows, groups] float32, out
    zero: np.ndarray,  # [rows, groups] float32, out
    q_min: np.float32,
    q_max: np.float32,
    symmetric: bool,
    eps: np.float32,
    significant_bits: int,
    min_exponent: int,
) -> None:
    masked = kept.shape[0] > 0
    for r in numba.prange(W.shape[0]):
        row = W[r]
        for index in range(groups.shape[0]):
            g = groups[index]
            first = group_columns[group_ptr[g]]
            last = group_columns[group_ptr[g + 1] - 1]
            if not masked and last - first == group_ptr[g + 1] - group_ptr[g] - 1:
                lo, hi = _min_max(row[first : last + 1])  # contiguous columns
            else:
                lo = np.float32(0.0)
                hi = np.float32(0.0)
                for t in range(group_ptr[g], group_ptr[g + 1]):
                    p = group_columns[t]
                    if masked and not kept[r, p]:
                        continue  # pruned: will be exactly 0, which the range always holds
                    lo = min(lo, row[p])
                    hi = max(hi, row[p])
            s, z = _qparams(lo, hi, q_min, q_max, symmetric, eps, significant_bits, min_exponent)
            scale[r, g] = s
            zero[r, g] = z


@numba.njit(parallel=True, cache=True)
def _sweep_block(
    W: np.ndarray,  # [E, rows, cols] float32, sweep order, changed in place
    U: np.ndarray,  # [E, cols, cols] float32, upper Cholesky factors of H^-1 (sweep order)
    i1: int,
    i2: int,
    Err: np.ndarray,  # [E, rows, >= i2 - i1] float32, out: scaled errors of the block's columns
    scale: np.ndarray,  # [E, rows, groups] float32
    zero: np.ndarray,  # [E, rows, groups] float32
    group_of_column: np.ndarray,  # [E, cols] int64: group of the column at each sweep position
    kept: np.ndarray,  # [E, rows, cols] bool (sweep order), or [0, 0, 0] when nothing is pruned
    q_min: np.float32,
    q_max: np.float32,
    is_float: bool,
    mantissa_bits: int,
    min_exponent: int,
    squared_error: np.ndarray,  # [E, rows] float64, accumulated: sum of err^2 per row
) -> None:
    n = i2 - i1
    rows = W.shape[1]
    masked = kept.shape[0] > 0
    # Loops run from 0 over slices: numba checks negative indices otherwise, which stops LLVM
    # from vectorising the update. The rows of all E weights are spread over the cores at once.
    for t in numba.prange(W.shape[0] * rows):
        b = t // rows
        r = t - b * rows
        w = W[b, r, i1:i2]  # this row's block, updated in place
        err_row = Err[b, r]
        factor = U[b]
        groups = group_of_column[b]
        total = 0.0
        for jj in range(n):
            j = i1 + jj
            g = groups[j]
            s = scale[b, r, g]
            z = zero[b, r, g]
            x = w[jj]
            if masked and not kept[b, r, j]:
                quantized = np.float32(0.0)
            else:
                code = _round_to_grid(
                    min(max(x / s + z, q_min), q_max), is_float, mantissa_bits, min_exponent
                )
                quantized = (code - z) * s
            e = (x - quantized) / factor[j, j]
            w[jj] = quantized
            err_row[jj] = e
            total += np.float64(e) * np.float64(e)
            tail = w[jj + 1 :]
            u = factor[j, j + 1 : i2]
            for k in range(tail.shape[0]):
                tail[k] = tail[k] - e * u[k]  # rank-1 update of the rest of the block
        squared_error[b, r] += total


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _mask(kept: torch.Tensor | None, ndim: int) -> np.ndarray:
    return np.zeros((0,) * ndim, dtype=np.bool_) if kept is None else _numpy(kept)


def _float_format(grid: Grid) -> tuple[bool, int, int]:
    """``(is_float, mantissa bits, smallest normal exponent)`` of a grid's codes."""
    if not grid.is_float:
        return False, 0, 0
    return True, int(grid.mantissa_bits), int(grid.min_normal_exponent)


def _scale_format(scale_dtype: torch.dtype) -> tuple[int, int]:
    """Significant bits and smallest normal exponent of the dtype scales are stored in."""
    significant_bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}.get(scale_dtype, 24)
    return significant_bits, int(round(math.log2(torch.finfo(scale_dtype).tiny)))


def open_groups_numba_(
    W: torch.Tensor,
    groups: torch.Tensor,
    group_ptr: torch.Tensor,
    group_columns: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    kept: torch.Tensor | None,
    q_min: int,
    q_max: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> None:
    """Fill ``scale[:, groups]``, ``zero_point[:, groups]`` from the current ``W`` (CPU tensors).

    Arguments as in ``sweep_torch.open_groups_torch_``.
    """
    significant_bits, min_exponent = _scale_format(scale_dtype)
    _open_groups(
        _numpy(W), _numpy(groups), _numpy(group_ptr), _numpy(group_columns), _mask(kept, 2),
        _numpy(scale), _numpy(zero_point), np.float32(q_min), np.float32(q_max), symmetric,
        np.float32(torch.finfo(torch.float32).eps), significant_bits, min_exponent,
    )


def sweep_block_numba_(
    W: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i2: int,
    Err: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_of_column: torch.Tensor,
    *,
    kept: torch.Tensor | None,
    grid: Grid,
    squared_error: torch.Tensor,
) -> None:
    """Sweep columns ``[i1, i2)`` of a batch of weights in place (CPU tensors only); see the
    module docstring.

    Arguments as in ``sweep_torch.sweep_block_torch_`` (``W: [E, rows, cols]``, one factor and
    grid per weight). All tensors must be contiguous CPU tensors; ``W``, ``U``, ``Err``,
    ``scale``, ``zero_point`` float32, ``squared_error`` float64, ``group_of_column`` int64.
    """
    _sweep_block(
        _numpy(W), _numpy(U), i1, i2, _numpy(Err), _numpy(scale), _numpy(zero_point),
        _numpy(group_of_column), _mask(kept, 3), np.float32(grid.q_min), np.float32(grid.q_max),
        *_float_format(grid), _numpy(squared_error),
    )
