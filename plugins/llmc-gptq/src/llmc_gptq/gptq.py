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
original weights (False, llm-compressor's choice). Group membership is always by *original*
column index, also with act-order, so the checkpoint needs no ``g_idx``.

Symbols: ``U`` the factor above; ``Err: [rows, block]`` the scaled errors ``(w − q) / U_jj``;
``ΔW = W − Ŵ``. Since ``W − Ŵ = E U`` for the matrix ``E`` of all scaled errors and
``H + λI = U⁻¹U⁻ᵀ``, the error in the damped metric is ``trace(ΔW (H + λI) ΔWᵀ) = ‖E‖²``,
which the sweep accumulates for free; ``trace(ΔW H ΔWᵀ) = ‖E‖² − λ‖ΔW‖²``.
"""

from __future__ import annotations

import logging
import time

import attrs
import torch

from llmc.hessian import inverse_cholesky_upper
from llmc.quantization import QuantizationArgs, compute_qparams, grid_of
from llmc_gptq.sweep_numba import open_groups_numba_, sweep_block_numba_
from llmc_gptq.sweep_torch import open_groups_torch_, sweep_block_torch_

__all__ = [
    "BACKENDS",
    "GPTQResult",
    "PreparedHessian",
    "gptq_quantize",
    "gptq_quantize_prepared",
    "reference_energy",
    "prepare_hessian",
    "sweep_order",
]

logger = logging.getLogger("llmc.gptq")

BACKENDS = ("auto", "numba", "torch")


@attrs.frozen
class GPTQResult:
    """What ``gptq_quantize`` found for one weight matrix.

    ``weight`` is on the grid of ``scale``/``zero_point`` (``(q − zero_point) · scale``, float32,
    original column order); ``scale`` has the shape of ``llmc.quantization.qparam_shape`` and
    the dtype asked for, ``zero_point`` is int8 of the same shape. ``damping`` is the dampening
    fraction finally used. ``hessian_error`` is ``trace(ΔW H ΔWᵀ)`` for the undamped ``H``,
    ``output_error`` the same relative to ``trace(W H Wᵀ)`` (the relative squared error of the
    layer's output on the calibration inputs), None when that reference was not available.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
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
    if strategy == "group":
        group_of_column = original // group_size  # [cols]: group of each sweep position
        n_groups = cols // group_size
    else:
        group_of_column = torch.zeros(cols, dtype=torch.long, device=device)
        n_groups = 1
    group_columns = torch.argsort(group_of_column, stable=True)  # positions, by group, ascending
    counts = torch.bincount(group_of_column, minlength=n_groups)
    group_ptr = torch.zeros(n_groups + 1, dtype=torch.long, device=device)
    group_ptr[1:] = torch.cumsum(counts, 0)
    return group_of_column.contiguous(), group_ptr, group_columns.contiguous(), n_groups


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
    started = time.perf_counter()
    hessian = H.detach().to(torch.float32)  # [cols, cols]; not copied, not changed
    diagonal = torch.diagonal(hessian).clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0  # as zero_dead_columns_ would leave it
    perm = sweep_order(diagonal, actorder)
    U, damping = inverse_cholesky_upper(hessian, dampening_frac, module_name=module_name, order=perm)
    lam = damping * diagonal.mean().item()
    return PreparedHessian(U.contiguous(), perm, dead, damping, lam, time.perf_counter() - started)


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
        group_size=group_size, args=args, block_size=block_size, kept=kept,
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
    block_size: int = 128,
    kept: torch.Tensor | None = None,
    lazy_group_params: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    output_energy: float | None = None,
    backend: str = "auto",
    module_name: str = "weight",
) -> GPTQResult:
    """``gptq_quantize`` with the work on ``H`` done (``prepare_hessian``); the same arguments.

    ``output_error`` is None unless ``output_energy`` is given.
    """
    started = time.perf_counter()
    rows, cols = W.shape
    if args is not None:
        strategy, group_size, symmetric = args.strategy, args.group_size, args.symmetric
    elif num_bits is None:
        raise ValueError("give either num_bits (an integer grid) or args")
    if prepared.U.shape != (cols, cols):
        raise ValueError(f"the prepared Hessian is for {prepared.U.shape[0]} columns, W has {cols}")
    if strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"strategy must be 'tensor', 'channel' or 'group' (got {strategy!r})")
    if strategy == "group" and (not group_size or cols % group_size):
        raise ValueError(f"group_size {group_size} does not divide the {cols} columns of {module_name}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive (got {block_size})")
    device = W.device
    chosen = _resolve_backend(backend, device)
    if args is None:
        args = QuantizationArgs(
            num_bits=num_bits,
            symmetric=symmetric,
            strategy=strategy,
            group_size=group_size if strategy == "group" else None,
        )
    grid = grid_of(args)
    U, perm = prepared.U.to(device), prepared.perm

    weight = W.detach().to(device=device, dtype=torch.float32).clone()  # [rows, cols], working copy
    weight[:, prepared.dead.to(device)] = 0.0
    if kept is not None:
        kept = kept.to(device=device, dtype=torch.bool)
        weight.mul_(kept)

    lazy = lazy_group_params and strategy == "group"
    group_of_column, group_ptr, group_columns, n_groups = _group_layout(cols, strategy, group_size, perm)
    if lazy:
        scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=device)
        zero = torch.zeros(rows, n_groups, dtype=torch.float32, device=device)
    else:
        # Up front, from the weights as they are before the sweep (min-max, as RTN does).
        fixed_scale, fixed_zero = compute_qparams(weight, args)  # [1], [rows, 1] or [rows, groups]
        fixed_scale = fixed_scale.to(scale_dtype).to(torch.float32)
        scale = fixed_scale.expand(rows, -1).contiguous() if strategy == "tensor" else fixed_scale.contiguous()
        zero = fixed_zero.to(torch.float32).expand(rows, -1).contiguous()

    if perm is not None:
        perm = perm.to(device)
        weight = weight.index_select(1, perm)  # columns in sweep order
        if kept is not None:
            kept = kept.index_select(1, perm)
    if kept is not None:
        kept = kept.contiguous()
    before_sweep = weight.clone()  # sweep order, for ‖ΔW‖²

    sweep = sweep_block_numba_ if chosen == "numba" else sweep_block_torch_
    # numba's group opening knows the integer min-max rule; float grids (their scale formats)
    # open through core's compute_qparams in torch
    open_groups = open_groups_numba_ if chosen == "numba" and not grid.is_float else open_groups_torch_
    first_position = group_columns[group_ptr[:-1]]  # [groups]: where each group opens
    Err = torch.zeros(rows, block_size, dtype=torch.float32, device=device)
    squared_error = torch.zeros(rows, dtype=torch.float64, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if lazy:  # groups whose first column lies in this block, from the current weights
            opening = torch.nonzero((first_position >= i1) & (first_position < i2)).flatten()
        if lazy and opening.numel() and open_groups is open_groups_numba_:
            open_groups(
                weight, opening, group_ptr, group_columns, scale, zero, kept=kept,
                q_min=args.q_min, q_max=args.q_max, symmetric=symmetric, scale_dtype=scale_dtype,
            )
        elif lazy and opening.numel():
            open_groups(
                weight, opening, group_ptr, group_columns, scale, zero, kept=kept, args=args,
                scale_dtype=scale_dtype,
            )
        sweep(
            weight, U, i1, i2, Err, scale, zero, group_of_column,
            kept=kept, grid=grid, squared_error=squared_error,
        )
        if i2 < cols:
            weight[:, i2:].addmm_(Err[:, : i2 - i1], U[i1:i2, i2:], alpha=-1.0)  # lazy batch update

    # trace(ΔW (H + λI) ΔWᵀ) = ‖E‖²  ->  trace(ΔW H ΔWᵀ) = ‖E‖² − λ ‖ΔW‖²
    delta_sq = torch.linalg.vector_norm(before_sweep.sub_(weight)).double().item() ** 2
    hessian_error = max(squared_error.sum().item() - prepared.lam * delta_sq, 0.0)
    del before_sweep

    if perm is not None:
        weight = weight.index_select(1, torch.argsort(perm))  # back to column order
    output_error = hessian_error / output_energy if output_energy else None
    if strategy == "tensor":
        scale, zero = scale[:1, 0], zero[:1, 0]  # [1]
    return GPTQResult(
        weight=weight,
        scale=scale.to(scale_dtype),
        zero_point=zero.to(grid.zero_point_dtype),
        damping=prepared.damping,
        hessian_error=hessian_error,
        output_error=output_error,
        seconds=time.perf_counter() - started,
        backend=chosen,
    )


@torch.no_grad()
def reference_energy(W: torch.Tensor, H: torch.Tensor, *, kept: torch.Tensor | None = None) -> float:
    """``trace(W H Wᵀ) = 2/N Σ ‖W x‖²``, what ``output_error`` is relative to (one product).

    ``W: [rows, cols]`` (pruned entries, ``kept`` False, taken as 0), ``H: [cols, cols]``.
    """
    W = W.detach().to(device=H.device, dtype=torch.float32)
    if kept is not None:
        W = W * kept.to(W.device)
    return torch.sum((W @ H.to(torch.float32)) * W, dtype=torch.float64).item()
