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

Group parameters are computed *lazily*: when the sweep reaches the first column of a group
(in sweep order), the group's ``scale``/``zero_point`` are taken from the current, error-updated
values of all of its columns (columns right of the block first receive this block's pending
updates), the choice the GPTQ paper makes, rather than from the original weights. Pruned
weights (``kept`` False) are set to exactly 0 when reached and their error is spread like any
other, so the rest of the row compensates for them.

This is the reference for ``sweep_numba`` (same arguments, same float32 arithmetic in the same
order) and the implementation used when the layer lives on a GPU: every operation is a torch
operation on the tensors' own device, so there is no host round trip per column.
"""

from __future__ import annotations

import torch

from llmc.quantization import QuantizationArgs, compute_qparams, fake_quantize

__all__ = ["sweep_block_torch_"]


def _channel_args(q_min: int, q_max: int, symmetric: bool) -> QuantizationArgs:
    num_bits = (q_max - q_min + 1).bit_length() - 1
    return QuantizationArgs(num_bits=num_bits, symmetric=symmetric, strategy="channel")


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
    group_ptr: torch.Tensor,
    group_columns: torch.Tensor,
    *,
    lazy: bool,
    kept: torch.Tensor | None,
    q_min: int,
    q_max: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    squared_error: torch.Tensor,
) -> None:
    """Sweep columns ``[i1, i2)`` of ``W`` in place (see the module docstring).

    - ``W: [rows, cols]`` float32 in sweep order; on return columns ``[i1, i2)`` hold their
      quantized values ``(q - zero_point) * scale`` and columns up to ``i2`` are updated.
    - ``U: [cols, cols]`` float32, upper Cholesky factor of the damped ``H⁻¹`` (sweep order).
    - ``Err: [rows, >= i2 - i1]``: receives the scaled errors ``err_j`` of the block.
    - ``scale``, ``zero_point: [rows, groups]`` float32 (zero points hold integers); groups
      with ``lazy`` True are filled when the sweep reaches them, others are read.
    - ``group_of_column: [cols]``: the group of the column at each sweep position;
      ``group_columns[group_ptr[g]:group_ptr[g + 1]]``: the sweep positions of group ``g``'s
      columns, ascending (a CSR list). These three int64 tensors live on the CPU whatever the
      device of ``W``.
    - ``kept: [rows, cols]`` bool in sweep order, or None: False marks pruned weights.
    - ``scale_dtype``: the dtype the scales are stored in; lazily computed scales are rounded
      to it before use, so the codes match the stored scale exactly.
    - ``squared_error: [rows]`` float64, accumulates ``Σ_j err_j²`` per row (with ``H⁻¹ =
      UᵀU`` this is ``ΔW H ΔWᵀ`` for the damped ``H``).
    """
    args = _channel_args(q_min, q_max, symmetric)
    # Control flow reads small CPU index tensors once per block: no host round trip per column.
    groups = group_of_column[i1:i2].tolist()
    ptr = group_ptr.tolist()
    block = W[:, i1:i2]  # [rows, i2 - i1], a view
    for j in range(i1, i2):
        g = groups[j - i1]
        if lazy and int(group_columns[ptr[g]]) == j:
            columns = group_columns[ptr[g] : ptr[g + 1]]
            _group_qparams_(W, U, Err, i1, i2, j, g, scale, zero_point, columns, kept, args, scale_dtype)
        column = W[:, j : j + 1]  # [rows, 1]
        quantized = fake_quantize(column, scale[:, g : g + 1], zero_point[:, g : g + 1], args)
        if kept is not None:
            quantized = torch.where(kept[:, j : j + 1], quantized, torch.zeros_like(quantized))
        err = (column - quantized) / U[j, j]  # [rows, 1]
        W[:, j : j + 1] = quantized
        Err[:, j - i1 : j - i1 + 1] = err
        squared_error += err[:, 0].double().square()
        block[:, j + 1 - i1 :] -= err * U[j : j + 1, j + 1 : i2]  # rank-1 update of the block


def _group_qparams_(
    W: torch.Tensor,
    U: torch.Tensor,
    Err: torch.Tensor,
    i1: int,
    i2: int,
    j: int,
    g: int,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    columns: torch.Tensor,
    kept: torch.Tensor | None,
    args: QuantizationArgs,
    scale_dtype: torch.dtype,
) -> None:
    """Min-max parameters of group ``g`` (sweep positions ``columns``, CPU, ascending) from its
    columns' current values, the sweep being at column ``j``."""
    beyond = int(torch.searchsorted(columns, i2))  # columns[beyond:] lie right of the block
    on_device = columns.to(W.device)
    values = W[:, on_device]  # [rows, group_size], a copy
    if j > i1 and beyond < len(columns):
        # updates this block owes the columns right of it, not applied yet (lazy batches)
        values[:, beyond:] -= Err[:, : j - i1] @ U[i1:j, on_device[beyond:]]
    if kept is not None:
        values = torch.where(kept[:, on_device], values, torch.zeros_like(values))
    group_scale, group_zero = compute_qparams(values, args)  # [rows, 1] each
    scale[:, g : g + 1] = group_scale.to(scale_dtype).to(scale.dtype)
    zero_point[:, g : g + 1] = group_zero.to(zero_point.dtype)
