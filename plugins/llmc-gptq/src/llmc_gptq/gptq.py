"""GPTQ for one weight matrix: tensors and numbers in, quantized weight and its grid out.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, arXiv 2210.17323) solves, for one Linear with
weight ``W: [rows, cols]`` (rows = out_features, cols = in_features) and calibration inputs
``X: [N, cols]``, the layer-wise problem

    min over Ŵ on the quantization grid of  ‖X Wᵀ − X Ŵᵀ‖²,   whose Hessian is H = 2/N XᵀX

(``H: [cols, cols]``) by quantizing one column at a time and updating the remaining columns
to compensate (Optimal Brain Surgeon, paper eq. 2-3), with the inverse Hessian in its Cholesky
form (§3 "Step 3") and lazy batch updates in blocks of ``block_size`` columns (§3 "Step 2")::

    W, H  <- dead inputs (H_ii = 0) fixed at 0;  pruned weights (kept False) set to 0
    perm  <- columns by descending diag(H)        (act-order, optional)
    U     <- upper Cholesky of (H + λI)⁻¹, λ = dampening_frac · mean(diag H), raised
             step by step until H + λI is positive definite (llmc.hessian)
    for each block [i1, i2) of columns:           (sweep_numba on CPU, sweep_torch on GPU)
        sweep the block column by column: quantize, error, rank-1 update of the block
        W[:, i2:] -= Err @ U[i1:i2, i2:]          (one BLAS product per block)
    undo perm

The grid is whatever the weights' arguments define (``llmc.quantization.grid_of``): integers
of 2-8 bits, or a float format (FP8 E4M3, ...) whose rounding the sweeps share with core's
round-to-nearest, so a GPTQ weight is on exactly the grid the checkpoint stores.

Group parameters (``scale``, ``zero_point``) are computed when the sweep reaches the block
holding a group's first column, from the error-updated values of the group's columns
(``lazy_group_params=True``, what the paper's reference code does), or up front from the
original weights (False, llm-compressor's choice and ``GPTQRun``'s default: better on both real
models measured, docs/benchmarks.md). Group membership is always by *original*
column index, also with act-order, so the checkpoint needs no ``g_idx``.

Symbols: ``U`` the factor above; ``Err: [rows, block]`` the scaled errors ``(w − q) / U_jj``;
``ΔW = W − Ŵ``. Since ``W − Ŵ = E U`` for the matrix ``E`` of all scaled errors and
``H + λI = U⁻¹U⁻ᵀ``, the error in the damped metric is ``trace(ΔW (H + λI) ΔWᵀ) = ‖E‖²``,
which the sweep accumulates for free; ``trace(ΔW H ΔWᵀ) = ‖E‖² − λ‖ΔW‖²``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import attrs
import torch

from llmc.hessian import inverse_cholesky_upper_batch
from llmc.quantization import (
    QuantizationArgs,
    compute_qparams,
    effective_scale,
    global_scale_from_range,
    grid_of,
)
from llmc_gptq.sweep_numba import open_groups_numba_, sweep_block_numba_
from llmc_gptq.sweep_torch import open_groups_torch_, sweep_block_torch_

__all__ = [
    "BACKENDS",
    "GPTQResult",
    "PreparedHessian",
    "gptq_quantize",
    "gptq_quantize_batch",
    "gptq_quantize_prepared",
    "reference_energy",
    "prepare_hessian",
    "prepare_hessians",
    "sweep_order",
]

logger = logging.getLogger("llmc.gptq")

BACKENDS = ("auto", "numba", "torch")


@attrs.frozen
class GPTQResult:
    """What ``gptq_quantize`` found for one weight matrix.

    ``weight`` is on the grid of ``scale``/``zero_point`` (``(q − zero_point) · scale``, float32,
    original column order); ``scale`` has the shape of ``llmc.quantization.qparam_shape`` and
    the dtype asked for, ``zero_point`` is int8 of the same shape (float zeros for float grids);
    ``global_scale`` is NVFP4's float32 ``[1]`` (None for other schemes). ``damping`` is the dampening
    fraction finally used. ``hessian_error`` is ``trace(ΔW H ΔWᵀ)`` for the undamped ``H``,
    ``output_error`` the same relative to ``trace(W H Wᵀ)`` (the relative squared error of the
    layer's output on the calibration inputs), None when that reference was not available.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    global_scale: torch.Tensor | None
    damping: float
    hessian_error: float
    output_error: float | None
    seconds: float
    backend: str


def sweep_order(diagonal: torch.Tensor, actorder: bool) -> torch.Tensor | None:
    """Act-order permutation: columns by descending ``diag(H)``, ties in column order; or None."""
    if not actorder:
        return None
    return torch.argsort(diagonal, descending=True, stable=True)


def _group_layout(
    cols: int, strategy: str, group_size: int | None, perm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``group_of_column`` (per sweep position), CSR ``group_ptr``/``group_columns``, groups.

    On the CPU: the sweeps use them for control flow.
    """
    device = torch.device("cpu")
    original = torch.arange(cols, device=device) if perm is None else perm.to(device)
    if group_size is not None:  # groups (or blocks) of columns, by original index
        group_of_column = original // group_size  # [cols]: group of each sweep position
        n_groups = -(-cols // group_size)
    else:
        group_of_column = torch.zeros(cols, dtype=torch.long, device=device)
        n_groups = 1
    group_columns = torch.argsort(group_of_column, stable=True)  # positions, by group, ascending
    counts = torch.bincount(group_of_column, minlength=n_groups)
    group_ptr = torch.zeros(n_groups + 1, dtype=torch.long, device=device)
    group_ptr[1:] = torch.cumsum(counts, 0)
    return group_of_column.contiguous(), group_ptr, group_columns.contiguous(), n_groups


def _column_group_size(args: QuantizationArgs) -> int | None:
    """Columns per scale along a row: the group size, a block's width, or None (one scale)."""
    if args.strategy in ("group", "tensor_group"):
        return args.group_size
    if args.strategy == "block":
        return args.block_structure[1]
    return None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "numba" if device.type == "cpu" else "torch"
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"the numba sweep runs on CPU tensors only (got device {device}); use backend 'torch'")
    return backend


@attrs.frozen
class PreparedHessian:
    """What the sweep needs from ``H``, computed once for all modules that read one input.

    ``U: [cols, cols]``, the upper Cholesky factor of the damped ``H⁻¹`` in sweep order;
    ``perm`` the act-order permutation (or None); ``dead`` the inputs that never fired (their
    weights are fixed at 0); ``damping`` the dampening fraction used and ``lam`` λ itself.
    """

    U: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damping: float
    lam: float
    seconds: float


@torch.no_grad()
def prepare_hessian(
    H: torch.Tensor, *, dampening_frac: float = 0.01, actorder: bool = False, module_name: str = "weight"
) -> PreparedHessian:
    """Dead inputs, act-order permutation and damped inverse Cholesky factor of ``H: [cols, cols]``."""
    (prepared,) = prepare_hessians([H], dampening_frac=dampening_frac, actorder=actorder, module_names=[module_name])
    return prepared


@torch.no_grad()
def prepare_hessians(
    hessians: Sequence[torch.Tensor],
    *,
    dampening_frac: float = 0.01,
    actorder: bool = False,
    module_names: Sequence[str],
) -> list[PreparedHessian]:
    """``prepare_hessian`` of E Hessians of one width, factored together
    (``llmc.hessian.inverse_cholesky_upper_batch``: batched calls on a GPU); their factors are
    views of one ``[E, cols, cols]`` tensor, which ``gptq_quantize_batch`` uses without a copy."""
    started = time.perf_counter()
    deads, diagonals, perms = [], [], []
    for H in hessians:
        hessian = H.detach().to(torch.float32)  # [cols, cols]; not copied, not changed
        diagonal = torch.diagonal(hessian).clone()
        dead = diagonal == 0
        diagonal[dead] = 1.0  # as zero_dead_columns_ would leave it
        deads.append(dead)
        diagonals.append(diagonal)
        perms.append(sweep_order(diagonal, actorder))
    U, dampings = inverse_cholesky_upper_batch(
        [H.detach().to(torch.float32) for H in hessians], dampening_frac, module_names=module_names, orders=perms,
    )
    U = U.contiguous()
    seconds = (time.perf_counter() - started) / len(hessians)  # the batch's time, shared out
    return [
        PreparedHessian(U[index], perms[index], deads[index], damping, damping * diagonals[index].mean().item(), seconds)
        for index, damping in enumerate(dampings)
    ]


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    num_bits: int | None = None,
    symmetric: bool = True,
    strategy: str = "group",
    group_size: int | None = 128,
    args: QuantizationArgs | None = None,
    global_scale: torch.Tensor | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = False,
    kept: torch.Tensor | None = None,
    lazy_group_params: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    output_energy: float | None = None,
    backend: str = "auto",
    module_name: str = "weight",
) -> GPTQResult:
    """Quantize ``W: [rows, cols]`` with GPTQ given ``H: [cols, cols]`` (see the module docstring).

    - ``num_bits``, ``symmetric``, ``strategy`` ("tensor", "channel", "group"), ``group_size``:
      the integer grid, with min-max parameters computed as ``llmc.quantization`` does; or
      ``args``, the weights' ``QuantizationArgs`` of any grid llmc knows (FP8, ...), instead.
    - ``kept``: bool ``[rows, cols]``, False for weights a pruning step removed; they come out
      exactly 0 and the other weights of their row compensate for them.
    - ``scale_dtype``: the dtype the scale is stored in (the weight's dtype); the sweep uses the
      scale rounded to it, so the stored codes are exactly the codes GPTQ chose.
    - ``output_energy``: ``trace(W H Wᵀ)`` if the caller measured it (``2/N Σ ‖W x‖²`` over the
      calibration tokens); otherwise it is computed here (one extra matrix product).
    - ``backend``: "numba" (CPU), "torch" (any device) or "auto" (numba on CPU).

    Neither ``W`` nor ``H`` is changed. Raises ``llmc.CalibrationError`` naming ``module_name``
    when no damping up to 2⁷ · ``dampening_frac`` makes ``H`` positive definite. Modules that
    share an input can share the work on ``H``: ``prepare_hessian`` once, then
    ``gptq_quantize_prepared`` per module.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {list(H.shape)}, expected [{cols}, {cols}] for W of shape {list(W.shape)}")
    H = H.to(W.device)
    prepared = prepare_hessian(H, dampening_frac=dampening_frac, actorder=actorder, module_name=module_name)
    if output_energy is None:
        output_energy = reference_energy(W, H, kept=kept)
    result = gptq_quantize_prepared(
        W, prepared, num_bits=num_bits, symmetric=symmetric, strategy=strategy,
        group_size=group_size, args=args, global_scale=global_scale, block_size=block_size, kept=kept,
        lazy_group_params=lazy_group_params, scale_dtype=scale_dtype,
        output_energy=output_energy, backend=backend, module_name=module_name,
    )
    return attrs.evolve(result, seconds=result.seconds + prepared.seconds)


@torch.no_grad()
def gptq_quantize_prepared(
    W: torch.Tensor,
    prepared: PreparedHessian,
    *,
    num_bits: int | None = None,
    symmetric: bool = True,
    strategy: str = "group",
    group_size: int | None = 128,
    args: QuantizationArgs | None = None,
    global_scale: torch.Tensor | None = None,
    block_size: int = 128,
    kept: torch.Tensor | None = None,
    lazy_group_params: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    output_energy: float | None = None,
    backend: str = "auto",
    module_name: str = "weight",
) -> GPTQResult:
    """``gptq_quantize`` with the work on ``H`` done (``prepare_hessian``); the same arguments.

    ``output_error`` is None unless ``output_energy`` is given. This is ``gptq_quantize_batch``
    of one weight.
    """
    (result,) = gptq_quantize_batch(
        [W], [prepared], num_bits=num_bits, symmetric=symmetric, strategy=strategy,
        group_size=group_size, args=args, global_scales=[global_scale], block_size=block_size,
        kept=[kept], lazy_group_params=lazy_group_params, scale_dtype=scale_dtype,
        output_energies=[output_energy], backend=backend, module_names=[module_name],
    )
    return result


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, but without a copy when they are the consecutive slices of one
    batch (the factors of ``prepare_hessians``): a batch of factors can be large."""
    first = tensors[0]
    step = first.numel()
    if all(
        t.is_contiguous() and t.shape == first.shape and t.device == first.device and t.dtype == first.dtype
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + index * step
        for index, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(tensors)


def _fixed_params(
    weight: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up-front ``(scale, zero, stored)`` of one weight ``[rows, cols]``, from its values before
    the sweep (min-max, as RTN does): ``scale``, ``zero`` per (row, group) for the sweep,
    ``stored`` in the shape the checkpoint keeps."""
    rows = weight.shape[0]
    fixed_scale, fixed_zero = compute_qparams(weight, args, global_scale)
    fixed_scale = fixed_scale.to(scale_dtype)  # [1], [rows, 1], [rows, groups] or blocks
    stored = fixed_scale.to(torch.float32)
    scale = effective_scale(stored, global_scale)
    zero = fixed_zero.to(torch.float32)
    if args.strategy == "block":  # one row of blocks per block_rows rows of the weight
        block_rows = args.block_structure[0]
        scale = scale.repeat_interleave(block_rows, dim=0)[:rows]
        zero = zero.repeat_interleave(block_rows, dim=0)[:rows]
    return scale.expand(rows, -1).contiguous(), zero.expand(rows, -1).contiguous(), stored


@torch.no_grad()
def gptq_quantize_batch(
    weights: Sequence[torch.Tensor],
    prepared: Sequence[PreparedHessian],
    *,
    num_bits: int | None = None,
    symmetric: bool = True,
    strategy: str = "group",
    group_size: int | None = 128,
    args: QuantizationArgs | None = None,
    global_scales: Sequence[torch.Tensor | None] | None = None,
    block_size: int = 128,
    kept: Sequence[torch.Tensor | None] | None = None,
    lazy_group_params: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    output_energies: Sequence[float | None] | None = None,
    backend: str = "auto",
    module_names: Sequence[str] | None = None,
) -> list[GPTQResult]:
    """``gptq_quantize_prepared`` of E weights of one shape at once, each with its own prepared
    Hessian, global scale, mask and output energy (the per-weight arguments become sequences).

    The E weights are swept together: one batched kernel call per block and one batched
    product per lazy update, instead of E of each (MoE experts). On CPU each result equals the
    one of ``gptq_quantize_prepared`` for that weight bit for bit; with act-order the weights'
    column orders differ and each has its own group layout. ``seconds`` is the batch's time
    shared out.
    """
    started = time.perf_counter()
    count = len(weights)
    rows, cols = weights[0].shape
    names = list(module_names) if module_names is not None else ["weight"] * count
    if len(prepared) != count or any(W.shape != (rows, cols) for W in weights):
        raise ValueError(f"a batch needs one prepared Hessian per weight and weights of one shape ({names[0]})")
    if args is not None:
        strategy, group_size, symmetric = args.strategy, args.group_size, args.symmetric
    elif num_bits is None:
        raise ValueError("give either num_bits (an integer grid) or args")
    for one in prepared:
        if one.U.shape != (cols, cols):
            raise ValueError(f"the prepared Hessian is for {one.U.shape[0]} columns, W has {cols}")
    if strategy not in ("tensor", "channel", "group", "tensor_group", "block"):
        raise ValueError(
            f"strategy must be 'tensor', 'channel', 'group', 'tensor_group' or 'block' (got {strategy!r})"
        )
    if strategy in ("group", "tensor_group") and (not group_size or cols % group_size):
        raise ValueError(f"group_size {group_size} does not divide the {cols} columns of {names[0]}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive (got {block_size})")
    acted = prepared[0].perm is not None
    if any((one.perm is not None) != acted for one in prepared):
        raise ValueError("the weights of a batch are all swept in act-order or none is")
    device = weights[0].device
    chosen = _resolve_backend(backend, device)
    if args is None:
        args = QuantizationArgs(
            num_bits=num_bits,
            symmetric=symmetric,
            strategy=strategy,
            group_size=group_size if strategy == "group" else None,
        )
    grid = grid_of(args)
    U = _stacked([one.U.to(device) for one in prepared])  # [E, cols, cols]

    weight = torch.stack([W.detach().to(device=device, dtype=torch.float32) for W in weights])  # [E, rows, cols]
    weight.masked_fill_(torch.stack([one.dead.to(device) for one in prepared])[:, None, :], 0.0)
    masks = None
    if kept is not None and any(mask is not None for mask in kept):
        masks = torch.stack([
            mask.to(device=device, dtype=torch.bool) if mask is not None
            else torch.ones(rows, cols, dtype=torch.bool, device=device)
            for mask in kept
        ])  # [E, rows, cols]
        weight.mul_(masks)

    global_scales = list(global_scales) if global_scales is not None else [None] * count
    for index in range(count):
        if args.has_global_scale and global_scales[index] is None:  # NVFP4: the weight's own
            global_scales[index] = global_scale_from_range(*torch.aminmax(weight[index]))
        if global_scales[index] is not None:
            global_scales[index] = global_scales[index].to(device=device, dtype=torch.float32).reshape(1)
    has_global = global_scales[0] is not None
    # Groups open as the sweep reaches them; a block spans rows, so its scale is fixed up front.
    lazy = lazy_group_params and strategy in ("group", "tensor_group")
    # ``scale``: what codes are computed against, per (row, group); ``stored``: what the
    # checkpoint keeps (the same but for NVFP4, whose stored scales sit under the global one).
    column_group = _column_group_size(args)
    perms = [one.perm.to(device) if acted else None for one in prepared]
    layouts = [_group_layout(cols, strategy, column_group, perm) for perm in perms]
    group_ptr, n_groups = layouts[0][1], layouts[0][3]  # group sizes do not depend on the order
    group_of_column = torch.stack([layout[0] for layout in layouts])  # [E, cols], CPU
    group_columns = [layout[2] for layout in layouts]
    if lazy:
        scale = torch.zeros(count, rows, n_groups, dtype=torch.float32, device=device)
        zero = torch.zeros(count, rows, n_groups, dtype=torch.float32, device=device)
        stored = torch.zeros_like(scale) if has_global else scale
        stored_of = [stored[index] for index in range(count)]
    else:
        fixed = [_fixed_params(weight[index], args, global_scales[index], scale_dtype) for index in range(count)]
        scale = torch.stack([one[0] for one in fixed])  # [E, rows, groups]
        zero = torch.stack([one[1] for one in fixed])
        stored_of = [one[2] for one in fixed]
        del fixed

    if acted:
        order = torch.stack(perms)[:, None, :].expand(count, rows, cols)
        weight = weight.gather(2, order)  # columns in sweep order
        if masks is not None:
            masks = masks.gather(2, order)
        del order
    if masks is not None:
        masks = masks.contiguous()
    before_sweep = weight.clone()  # sweep order, for ‖ΔW‖²

    sweep = sweep_block_numba_ if chosen == "numba" else sweep_block_torch_
    # numba's group opening knows the integer min-max rule; float grids (their scale formats)
    # open through core's compute_qparams in torch
    open_groups = open_groups_numba_ if chosen == "numba" and not grid.is_float else open_groups_torch_

    def open_in(index: int | None, opening: torch.Tensor) -> None:
        """Open ``opening`` groups of weight ``index``, or of all weights at once (None): rows
        are independent, so the batch opens as one matrix of E · rows rows."""
        if index is None:
            views = (
                weight.view(count * rows, cols), scale.view(count * rows, n_groups),
                zero.view(count * rows, n_groups), None if masks is None else masks.view(count * rows, cols),
                None if stored is scale else stored.view(count * rows, n_groups),
            )
            columns = group_columns[0]
        else:
            views = (
                weight[index], scale[index], zero[index], None if masks is None else masks[index],
                None if stored is scale else stored[index],
            )
            columns = group_columns[index]
        W_, scale_, zero_, kept_, stored_ = views
        if open_groups is open_groups_numba_:
            open_groups(
                W_, opening, group_ptr, columns, scale_, zero_, kept=kept_,
                q_min=args.q_min, q_max=args.q_max, symmetric=symmetric, scale_dtype=scale_dtype,
            )
        else:
            open_groups(
                W_, opening, group_ptr, columns, scale_, zero_, kept=kept_, args=args,
                scale_dtype=scale_dtype, global_scale=None if index is None else global_scales[index],
                stored=stored_,
            )

    # where each group opens, per weight: [E, groups]
    first_position = torch.stack([columns[group_ptr[:-1]] for columns in group_columns])
    Err = torch.zeros(count, rows, block_size, dtype=torch.float32, device=device)
    squared_error = torch.zeros(count, rows, dtype=torch.float64, device=device)
    as_one = not acted and not has_global  # one layout, no per-weight scale: open all at once
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if lazy:  # groups whose first column lies in this block, from the current weights
            opening = (first_position >= i1) & (first_position < i2)  # [E, groups]
            if as_one:
                chosen_groups = torch.nonzero(opening[0]).flatten()
                if chosen_groups.numel():
                    open_in(None, chosen_groups)
            else:
                for index in range(count):
                    chosen_groups = torch.nonzero(opening[index]).flatten()
                    if chosen_groups.numel():
                        open_in(index, chosen_groups)
        sweep(
            weight, U, i1, i2, Err, scale, zero, group_of_column,
            kept=masks, grid=grid, squared_error=squared_error,
        )
        if i2 < cols:  # lazy batch update, one batched product for the E weights
            weight[:, :, i2:].baddbmm_(Err[:, :, : i2 - i1], U[:, i1:i2, i2:], alpha=-1.0)

    seconds = (time.perf_counter() - started) / count
    results = []
    for index in range(count):
        # trace(ΔW (H + λI) ΔWᵀ) = ‖E‖²  ->  trace(ΔW H ΔWᵀ) = ‖E‖² − λ ‖ΔW‖²
        delta_sq = torch.linalg.vector_norm(before_sweep[index].sub_(weight[index])).double().item() ** 2
        hessian_error = max(squared_error[index].sum().item() - prepared[index].lam * delta_sq, 0.0)
        result_weight = weight[index]
        if acted:
            result_weight = result_weight.index_select(1, torch.argsort(perms[index]))  # back to column order
        elif count > 1:
            result_weight = result_weight.clone()  # its own storage (results are sent between ranks)
        energy = output_energies[index] if output_energies is not None else None
        zero_point = zero[index]
        if strategy == "tensor":
            zero_point = zero_point[:1, 0]  # [1], as the scale
        elif strategy == "block":
            zero_point = zero_point[:: args.block_structure[0]]  # back to one row per row of blocks
        stored_scale = stored_of[index].to(scale_dtype)
        results.append(GPTQResult(
            weight=result_weight,
            scale=stored_scale.clone() if count > 1 and lazy else stored_scale,
            global_scale=global_scales[index],
            zero_point=zero_point.to(args.zero_point_dtype).clone() if count > 1 else zero_point.to(args.zero_point_dtype),
            damping=prepared[index].damping,
            hessian_error=hessian_error,
            output_error=hessian_error / energy if energy else None,
            seconds=seconds,
            backend=chosen,
        ))
    return results


@torch.no_grad()
def reference_energy(W: torch.Tensor, H: torch.Tensor, *, kept: torch.Tensor | None = None) -> float:
    """``trace(W H Wᵀ) = 2/N Σ ‖W x‖²``, what ``output_error`` is relative to (one product).

    ``W: [rows, cols]`` (pruned entries, ``kept`` False, taken as 0), ``H: [cols, cols]``.
    """
    W = W.detach().to(device=H.device, dtype=torch.float32)
    if kept is not None:
        W = W * kept.to(W.device)
    return torch.sum((W @ H.to(torch.float32)) * W, dtype=torch.float64).item()
