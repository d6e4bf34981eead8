"""The GPTQ column sweep inside one block, in torch: the reference, and the path for GPUs.

GPTQ (Frantar et al., arXiv 2210.17323, Algorithm 1) quantizes the columns of ``W: [rows,
cols]`` one at a time, in sweep order, and after each column spreads its rounding error over
the columns not yet quantized, using ``U``, the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``,
``U: [cols, cols]``). For column ``j``::

    q_j      = quant(W[:, j])                        round to the grid of (scale, zero_point)
    err_j    = (W[:, j] - q_j) / U[j, j]             the error, scaled (paper eq. 5)
    W[:, k] -= err_j * U[j, k]     for k > j         optimal update of the rest (OBS, eq. 3)

Lazy batch updates (§3 "Step 2"): only the columns of the current block ``[i1, i2)`` are
updated column by column; the columns right of the block receive all of the block's updates
at once, ``W[:, i2:] -= Err @ U[i1:i2, i2:]``, a matrix product the caller does in BLAS::

    cols:  | done (quantized) | block [i1, i2): swept here | pending: one GEMM after the block |

Group parameters (``scale``, ``zero_point``) are computed from the error-updated weights: when
the sweep reaches the block that holds a group's first column (in sweep order), from the
current values of all of the group's columns (``open_groups_torch_``). At a block's start every
update of the earlier blocks has been applied, so these values are exact; this is also what
the paper's reference code does (it reads them from the matrix as it stood at the start of the
block). Pruned weights (``kept`` False) are set to exactly 0 when reached and their error is
spread like any other, so the rest of the row compensates for them.

This is the reference for ``sweep_numba`` (same arguments, same float32 arithmetic in the same
order, bit-for-bit equal results) and the implementation used when the layer lives on a GPU:
every operation is a torch operation on the tensors' own device, and the loop's control flow
reads small CPU index tensors, so there is no host round trip per column.
"""

from __future__ import annotations

import torch

from llmc.quantization import Grid, QuantizationArgs, compute_qparams, effective_scale

__all__ = ["open_groups_torch_", "sweep_block_torch_"]


@torch.no_grad()
def open_groups_torch_(
    W: torch.Tensor,
    groups: torch.Tensor,
    group_ptr: torch.Tensor,
    group_columns: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    kept: torch.Tensor | None,
    args: QuantizationArgs,
    scale_dtype: torch.dtype,
    global_scale: torch.Tensor | None = None,
    stored: torch.Tensor | None = None,
) -> None:
    """Min-max parameters of ``groups`` from the current values of their columns.

    - ``W: [rows, cols]`` float32 in sweep order, as the sweep has left it;
    - ``groups: [n]`` int64 (CPU), the groups to open; ``group_columns[group_ptr[g]:
      group_ptr[g + 1]]`` (CPU, a CSR list) are the sweep positions of group ``g``'s columns;
    - ``scale``, ``zero_point: [rows, groups]`` float32: columns ``groups`` are filled, the
      scale rounded to ``scale_dtype`` (the dtype it is stored in);
    - ``kept``: pruned weights (False) count as 0, the value they will get;
    - ``args``: the weights' group arguments, integer or float (``compute_qparams`` of core);
    - ``global_scale`` (NVFP4): the group scales are FP8 values under it; ``scale`` then gets
      the scale codes are computed against (``effective_scale``) and ``stored`` the scale the
      checkpoint keeps (``[rows, groups]``, float32).
    """
    if groups.numel() == 0:
        return
    ptr = group_ptr.tolist()
    chosen = groups.tolist()
    columns = torch.cat([group_columns[ptr[g] : ptr[g + 1]] for g in chosen]).to(W.device)
    values = W[:, columns]  # [rows, n * group_size], a copy
    if kept is not None:
        values = torch.where(kept[:, columns], values, torch.zeros_like(values))
    group_scale, group_zero = compute_qparams(values, args, global_scale)  # [rows, n] each
    group_scale = group_scale.to(scale_dtype)
    on_device = groups.to(scale.device)
    if stored is not None:
        stored[:, on_device] = group_scale.to(stored.dtype)
    scale[:, on_device] = effective_scale(group_scale.to(scale.dtype), global_scale).to(scale.dtype)
    zero_point[:, on_device] = group_zero.to(zero_point.dtype)


@torch.no_grad()
def sweep_block_torch_(
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
    """Sweep columns ``[i1, i2)`` of a batch of E weights in place (see the module docstring).

    Each weight has its own factor and grid parameters (E experts of one shape, or E = 1);
    every operation covers the whole batch, so a column costs the same launches for any E.

    - ``W: [E, rows, cols]`` float32 in sweep order; on return columns ``[i1, i2)`` hold their
      quantized values ``(q - zero_point) * scale`` and columns up to ``i2`` are updated.
    - ``U: [E, cols, cols]`` float32, upper Cholesky factors of the damped ``H⁻¹`` (sweep order).
    - ``Err: [E, rows, >= i2 - i1]``: receives the scaled errors ``err_j`` of the block.
    - ``scale``, ``zero_point: [E, rows, groups]`` float32 (zero points hold integers), already
      filled for every group with a column in the block.
    - ``group_of_column: [E, cols]`` int64 (CPU): the group of the column at each sweep
      position (they differ between weights with act-order).
    - ``kept: [E, rows, cols]`` bool in sweep order, or None: False marks pruned weights.
    - ``grid``: the codes' grid (``llmc.quantization.grid_of``): range and rounding, integer
      or float.
    - ``squared_error: [E, rows]`` float64, accumulates ``Σ_j err_j²`` per row (with ``H⁻¹ =
      UᵀU`` this is ``ΔW H ΔWᵀ`` for the damped ``H``).
    """
    count, rows = W.shape[0], W.shape[1]
    block_groups = group_of_column[:, i1:i2]  # [E, block], on the CPU
    shared = bool((block_groups == block_groups[:1]).all())
    if shared:
        groups = block_groups[0].tolist()  # control flow on the CPU: no sync per column
    else:
        index = block_groups.to(scale.device)  # [E, block]: gathered per column
    block = W[:, :, i1:i2]  # [E, rows, i2 - i1], a view
    for j in range(i1, i2):
        column = W[:, :, j : j + 1]  # [E, rows, 1]
        if shared:
            g = groups[j - i1]
            s, z = scale[:, :, g : g + 1], zero_point[:, :, g : g + 1]
        else:
            where = index[:, j - i1].view(count, 1, 1).expand(count, rows, 1)
            s, z = scale.gather(2, where), zero_point.gather(2, where)
        quantized = (grid.round_((column / s).add_(z)) - z) * s  # as llmc.quantization.math
        if kept is not None:
            quantized = torch.where(kept[:, :, j : j + 1], quantized, torch.zeros_like(quantized))
        err = (column - quantized) / U[:, j : j + 1, j : j + 1]  # [E, rows, 1]
        W[:, :, j : j + 1] = quantized
        Err[:, :, j - i1 : j - i1 + 1] = err
        squared_error += err[:, :, 0].double().square()
        block[:, :, j + 1 - i1 :] -= err * U[:, j : j + 1, j + 1 : i2]  # rank-1 update of the block
