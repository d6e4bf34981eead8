"""SparseGPT: prune a Linear's weights and compensate the error with second-order updates.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv 2301.00774. Objective, per Linear: min ‖XWᵀ − XŴᵀ‖² over Ŵ with the chosen mask, solved
column by column with the optimal-brain-surgeon update (§3, Alg. 1)::

    W: [rows, cols]      the weight (rows = outputs, cols = inputs), float32 working copy
    U: [cols, cols]      upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU, H = 2/N XᵀX damped)

    for each block of B columns [i1, i2):                    lazy batch updates (§3.2)
        choose the block's mask: lowest w²/U_ii² (the OBS saliency w²/[H⁻¹]_ii, with
        [H⁻¹]_ii taken from the Cholesky factor as in the paper's Alg. 1)
            unstructured: a share of the layer's budget, over all rows of the block
            N:M:          per row, every M columns, when the sweep reaches them
        ┌ for i in block:  e = w_i/U_ii if pruned else 0;  w_i ← 0;  w_j −= e·U_ij (j in block, > i)
        └ W[:, i2:] −= E · U[i1:i2, i2:]                      one matrix product per block

The sweep runs in numba on CPU (``kernels.sweep_block``, rows in parallel) and in torch on
other devices; both follow ``sweep_block_torch``, the reference the tests compare against.
Both take a batch of E weights of one shape, each with its own factor (``sparsegpt_batch_``:
MoE experts swept together; ``sparsegpt_`` is the batch of one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmc_sparsity.masks_nm import lowest_pruned_mask, pruned_count

__all__ = ["SparseGPTResult", "sparsegpt_", "sparsegpt_batch_", "sweep_block_torch"]


class SparseGPTResult:
    """What ``sparsegpt_`` returns: the kept mask and the OBS loss ½ Σ (w − q)²/U_ii²."""

    __slots__ = ("kept", "loss")

    def __init__(self, kept: torch.Tensor, loss: float) -> None:
        self.kept = kept
        self.loss = loss


def sweep_block_torch(
    W1: torch.Tensor,
    U1: torch.Tensor,
    pruned: torch.Tensor,
    keep_n: int,
    group_m: int,
    err: torch.Tensor,
    losses: torch.Tensor,
) -> None:
    """The column sweep of one block of E weights, vectorised over their rows (the numba
    kernel's contract with a leading batch dimension: ``W1: [E, rows, B]``, ``U1: [E, B, B]``,
    ``pruned``, ``err: [E, rows, B]``, ``losses: [E, rows]``)."""
    count = W1.shape[-1]
    diag = torch.diagonal(U1, dim1=-2, dim2=-1)  # [E, B]
    for i in range(count):
        if group_m and i % group_m == 0:
            group = slice(i, i + group_m)
            scores = W1[..., group] ** 2 / diag[:, None, group] ** 2  # [E, rows, m]
            worst = scores.topk(group_m - keep_n, dim=-1, largest=False).indices
            pruned[..., group] = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, worst, True)
        column = W1[..., i]  # [E, rows]
        e = torch.where(pruned[..., i], column / diag[:, i : i + 1], torch.zeros_like(column))  # [E, rows]
        losses += 0.5 * e.double() ** 2
        W1[..., i] = torch.where(pruned[..., i], torch.zeros_like(e), column)
        W1[..., i + 1 :] -= e[..., None] * U1[:, i : i + 1, i + 1 :]
        err[..., i] = e


def _choose_block_mask(
    W1: torch.Tensor, U1: torch.Tensor, count: int, pruned: torch.Tensor, use_numba: bool
) -> None:
    """Mark the ``count`` lowest saliencies w²/U_ii² of the block ``W1: [rows, B]`` pruned."""
    if use_numba:
        from llmc_sparsity.kernels import mark_lowest_saliency

        mark_lowest_saliency(W1.numpy(), U1.numpy(), count, pruned.numpy())
    else:
        saliency = W1**2 / torch.diagonal(U1)[None, :] ** 2  # [rows, B]
        pruned.copy_(lowest_pruned_mask(saliency, count))


def _sweep(W1, U1, pruned, keep_n, group_m, err, losses, use_numba: bool) -> None:
    if use_numba:
        from llmc_sparsity.kernels import sweep_block

        sweep_block(
            W1.numpy(), U1.numpy(), pruned.numpy(), keep_n, group_m, err.numpy(), losses.numpy()
        )
    else:
        sweep_block_torch(W1, U1, pruned, keep_n, group_m, err, losses)


@torch.no_grad()
def sparsegpt_(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    sparsity: float = 0.5,
    keep_n: int = 0,
    group_m: int = 0,
    block_size: int = 128,
    use_numba: bool | None = None,
) -> SparseGPTResult:
    """Prune ``W`` in place with SparseGPT; returns the kept mask and the OBS loss.

    ``W: [rows, cols]`` float32, ``U: [cols, cols]`` float32 upper Cholesky factor of the damped
    H⁻¹ (``llmc.hessian.inverse_cholesky_upper``). Unstructured (``group_m == 0``): exactly
    ``pruned_count(rows·cols, sparsity)`` weights are pruned, spread over the blocks by the
    cumulative count, each block choosing its share over all its rows. N:M: ``keep_n`` kept of
    every ``group_m`` consecutive columns of each row (``sparsity`` is then ignored);
    ``block_size`` and ``cols`` must be multiples of ``group_m``. ``use_numba``: default on CPU.
    This is ``sparsegpt_batch_`` of one weight.
    """
    if W.dtype != torch.float32 or U.dtype != torch.float32:
        raise TypeError("sparsegpt_ works on float32 W and U")
    (result,) = sparsegpt_batch_(
        W[None], U[None], sparsities=[sparsity], keep_n=keep_n, group_m=group_m,
        block_size=block_size, use_numba=use_numba,
    )
    return result


@torch.no_grad()
def sparsegpt_batch_(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    sparsities: Sequence[float],
    keep_n: int = 0,
    group_m: int = 0,
    block_size: int = 128,
    use_numba: bool | None = None,
) -> list[SparseGPTResult]:
    """``sparsegpt_`` of E weights of one shape at once (MoE experts), each with its own factor.

    ``W: [E, rows, cols]`` float32, pruned in place; ``U: [E, cols, cols]``; ``sparsities``: one
    per weight. Each block is swept for the E weights by one kernel call and updated by one
    batched product; an unstructured block's mask is still chosen per weight, over its own
    rows. On CPU each result equals ``sparsegpt_`` of that weight alone bit for bit.
    """
    count, rows, cols = W.shape
    if W.dtype != torch.float32 or U.dtype != torch.float32:
        raise TypeError("sparsegpt_ works on float32 W and U")
    if U.shape != (count, cols, cols) or len(sparsities) != count:
        raise ValueError(f"a batch of {count} weights [{rows}, {cols}] needs {count} factors and sparsities")
    if group_m and (cols % group_m or block_size % group_m):
        raise ValueError(
            f"N:M groups of {group_m} need the input width ({cols}) and block_size "
            f"({block_size}) to be multiples of {group_m}"
        )
    if use_numba is None:
        use_numba = W.device.type == "cpu"
    kept = torch.empty(count, rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(count, rows, dtype=torch.float64, device=W.device)
    # one set of block buffers for the whole sweep (the last block may be narrower)
    width = min(block_size, cols)
    W1_buffer = torch.empty(count, rows, width, dtype=W.dtype, device=W.device)
    pruned_buffer = torch.empty(count, rows, width, dtype=torch.bool, device=W.device)
    err_buffer = torch.empty(count, rows, width, dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        size = i2 - i1
        if size == width:
            W1, pruned, err = W1_buffer, pruned_buffer, err_buffer
        else:
            W1 = torch.empty(count, rows, size, dtype=W.dtype, device=W.device)
            pruned = torch.empty(count, rows, size, dtype=torch.bool, device=W.device)
            err = torch.empty(count, rows, size, dtype=W.dtype, device=W.device)
        W1.copy_(W[:, :, i1:i2])  # [E, rows, B] contiguous working copy
        U1 = U[:, i1:i2, i1:i2].contiguous()  # [E, B, B]
        pruned.zero_()
        if not group_m:
            for index, sparsity in enumerate(sparsities):
                share = pruned_count(rows * i2, sparsity) - pruned_count(rows * i1, sparsity)
                _choose_block_mask(W1[index], U1[index], share, pruned[index], use_numba)
        _sweep(W1, U1, pruned, keep_n, group_m, err, losses, use_numba)
        W[:, :, i1:i2] = W1
        torch.logical_not(pruned, out=kept[:, :, i1:i2])
        if i2 < cols:
            W[:, :, i2:].baddbmm_(err, U[:, i1:i2, i2:], alpha=-1.0)  # lazy update of later blocks
    return [
        SparseGPTResult(kept[index] if count == 1 else kept[index].clone(), float(losses[index].sum()))
        for index in range(count)
    ]
