"""Round-to-nearest quantization (integers and FP8 E4M3), bit for bit as compressed-tensors 0.20
computes it.

A checkpoint is only as good as the agreement between the weights llmc evaluates in memory and
the weights transformers and vLLM rebuild from it, so every operation here repeats the
reference's order of operations and dtypes (clamp before round, zero point added in the
weight's dtype, dequantization in the scale's dtype, ``finfo(dtype).eps`` for an all-zero
scale). ``tests/test_quantization_math.py`` checks the equality against compressed-tensors.

Symbols, for a weight ``W: [rows, cols]`` (rows = out_features, cols = in_features):

- ``scale``, ``zero_point``: ``[1]`` (tensor), ``[rows, 1]`` (channel) or
  ``[rows, cols / group_size]`` (group); ``zero_point`` is int8 and all zeros when symmetric.
- codes ``q = clamp(W / scale + zero_point, q_min, q_max)`` rounded half to even, in
  ``[q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]``; ``W_hat = (q - zero_point) * scale``.
- min-max observer: ``lo = min(min(W), 0)``, ``hi = max(max(W), 0)`` per channel/group, so zero
  is always exactly representable. Symmetric: ``scale = max(|lo|, |hi|) / ((q_max - q_min) / 2)``
  (4 bits: ``/ 7.5``). Asymmetric: ``scale = (hi - lo) / (q_max - q_min)``,
  ``zero_point = round(clamp(q_min - lo / scale, q_min, q_max))``.
- FP8 E4M3 (``type: float``, symmetric only): the same formulas on the grid ``[-448, 448]``
  (``grids.py``), so ``scale = max|W| / 448``; "rounding" is the cast to ``float8_e4m3fn``
  after clamping, codes are ``float8_e4m3fn`` and the zero point is ``float8_e4m3fn`` zeros.
"""

from __future__ import annotations

import functools

import torch

from llmc.errors import ArgumentError, CalibrationError
from llmc.quantization.grids import grid_of
from llmc.quantization.scheme import QuantizationArgs

__all__ = [
    "compute_qparams",
    "dequantize",
    "dynamic_activation_fake_quantize",
    "fake_quantize",
    "loader_stable_weight",
    "qparam_shape",
    "quantize",
    "recover_codes",
    "static_activation_fake_quantize",
]

# compressed-tensors stores integer zero points as the smallest integer dtype that holds
# num_bits (FP8 zero points are float8_e4m3fn: ``grid_of(args).zero_point_dtype``).
ZERO_POINT_DTYPE = torch.int8


def _check_groups(cols: int, group_size: int, shape: tuple[int, ...]) -> None:
    if cols % group_size:
        dims = ", ".join(str(d) for d in shape)
        raise CalibrationError(
            f"group_size {group_size} does not divide the input width {cols} of a tensor of "
            f"shape [{dims}]; choose a group_size that divides {cols} or leave the module "
            f"unquantized"
        )


def qparam_shape(weight_shape: tuple[int, ...] | torch.Size, args: QuantizationArgs) -> tuple:
    """Shape of ``scale`` and ``zero_point`` for a weight ``[rows, cols]`` under ``args``."""
    rows, cols = weight_shape
    if args.strategy == "tensor":
        return (1,)
    if args.strategy == "channel":
        return (rows, 1)
    if args.strategy == "group":
        _check_groups(cols, args.group_size, tuple(weight_shape))
        return (rows, cols // args.group_size)
    raise ArgumentError(
        f"strategy {args.strategy!r} has no static scale; per-token scales are computed at run "
        f"time by dynamic_activation_fake_quantize",
        name="strategy",
    )


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` from observed minima and maxima of the same shape."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    dtype = lo.dtype
    grid = grid_of(args)
    # q_max - q_min as a tensor of the observed dtype, as the reference divides by it.
    levels = torch.tensor(float(grid.q_max - grid.q_min)).to(dtype)
    if grid.is_float:  # symmetric only (QuantizationArgs refuses asymmetric FP8)
        scale = torch.maximum(lo.abs(), hi.abs()) / (levels / 2)
        scale = scale.masked_fill(scale == 0, torch.finfo(dtype).eps)
        zero_point = torch.zeros_like(scale).to(grid.zero_point_dtype)
        if scale.ndim == 0:
            scale, zero_point = scale.reshape(1), zero_point.reshape(1)
        return scale, zero_point
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (levels / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / levels
        zero_point = torch.tensor(float(args.q_min)) - lo / scale
        zero_point = zero_point.clamp(args.q_min, args.q_max)
        # An all-zero group gives 0 / 0; the reference's cast of that NaN yields 0 on CPU.
        zero_point = torch.nan_to_num(zero_point, nan=0.0)
    scale = scale.masked_fill(scale == 0, torch.finfo(dtype).eps)
    zero_point = torch.round(zero_point.clamp(-128, 127)).to(ZERO_POINT_DTYPE)
    if scale.ndim == 0:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return scale, zero_point


@torch.no_grad()
def compute_qparams(W: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` of ``W: [rows, cols]`` for a static strategy.

    ``scale`` has ``W``'s dtype (compressed-tensors creates the checkpoint parameter in the
    weight's dtype, so computing in another dtype would not survive a round trip); see the
    module docstring for the formulas and shapes.
    """
    if W.ndim != 2:
        raise ArgumentError(
            f"compute_qparams expects a 2-D weight [rows, cols] (got shape {list(W.shape)})",
            name="W",
        )
    qparam_shape(W.shape, args)  # validates strategy and group divisibility
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(W)
    elif args.strategy == "channel":
        lo, hi = torch.aminmax(W, dim=1, keepdim=True)  # [rows, 1]
    else:
        groups = W.unflatten(-1, (W.shape[-1] // args.group_size, args.group_size))
        lo, hi = torch.aminmax(groups, dim=-1)  # [rows, n_groups]
    return _qparams_from_range(lo, hi, args)


# Rows per piece of the element-wise kernels below, so a 14336-wide weight never has more than
# a few tens of MB of float64/float32 temporaries at once (whole-weight temporaries made RTN of
# one Llama-3-8B layer peak at ~2 GB). Results are element-wise, hence identical either way.
_PIECE_ELEMENTS = 1 << 22


def _by_rows(kernel):
    """Run an element-wise ``kernel(W, scale, zero_point, args, ...)`` on pieces of rows of a
    2-D ``W``, slicing per-row ``scale``/``zero_point`` alike, into one output tensor."""

    @functools.wraps(kernel)
    def pieces(W, scale, zero_point, args, *rest, **kwargs):  # noqa: ANN001, ANN202
        rows = W.shape[0] if W.ndim == 2 else 0
        step = max(1, _PIECE_ELEMENTS // max(1, W.shape[-1])) if rows else 0
        if not rows or rows <= step:
            return kernel(W, scale, zero_point, args, *rest, **kwargs)

        def part(tensor, piece):  # noqa: ANN001, ANN202
            if tensor is None or tensor.ndim == 0 or tensor.shape[0] != rows:
                return tensor
            return tensor[piece]

        out = None
        for start in range(0, rows, step):
            piece = slice(start, start + step)
            value = kernel(W[piece], part(scale, piece), part(zero_point, piece), args, *rest, **kwargs)
            if out is None:
                out = torch.empty((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
            out[piece] = value
        return out

    return pieces



def _grouped(
    W: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Views of ``W``, ``scale`` and ``zero_point`` that broadcast one scale per element."""
    if args.strategy != "group":
        return W, scale, zero_point
    _check_groups(W.shape[-1], args.group_size, tuple(W.shape))
    n_groups = W.shape[-1] // args.group_size
    W = W.unflatten(-1, (n_groups, args.group_size))  # [..., n_groups, group_size]
    scale = scale.unsqueeze(-1)  # [..., n_groups, 1]
    if zero_point is not None:
        zero_point = zero_point.unsqueeze(-1)
    return W, scale, zero_point


def _codes_as_float(
    W: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantizationArgs
) -> torch.Tensor:
    """Codes in ``W``'s dtype, already in grouped layout."""
    scaled = W / scale  # a new tensor: the rest works in place (same results, a third of the memory traffic)
    if zero_point is not None:
        scaled.add_(zero_point.to(W.dtype))
    return grid_of(args).round_(scaled)


def _from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype, in grouped layout."""
    values = codes.to(scale.dtype)
    if zero_point is not None:
        values = values - zero_point.to(scale.dtype)
    return values * scale


@torch.no_grad()
@_by_rows
def quantize(
    W: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """Codes of ``W: [rows, cols]`` in ``[q_min, q_max]``: int8, or float8_e4m3fn for FP8."""
    Wg, scale_g, zero_g = _grouped(W, scale, zero_point, args)
    codes = _codes_as_float(Wg, scale_g, zero_g, args)
    return codes.to(grid_of(args).code_dtype).reshape(W.shape)


@torch.no_grad()
@_by_rows
def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W_hat = (codes - zero_point) * scale``, computed in the scale's dtype, cast to ``dtype``."""
    codes_g, scale_g, zero_g = _grouped(codes, scale, zero_point, args)
    values = _from_codes(codes_g, scale_g, zero_g).reshape(codes.shape)
    return values.to(dtype if dtype is not None else scale.dtype)


@_by_rows
def fake_quantize(
    W: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """``dequantize(quantize(W))`` in ``W``'s dtype: the weight a loader rebuilds."""
    Wg, scale_g, zero_g = _grouped(W, scale, zero_point, args)
    codes = _codes_as_float(Wg, scale_g, zero_g, args)
    return _from_codes(codes, scale_g, zero_g).reshape(W.shape).to(W.dtype)


@torch.no_grad()
@_by_rows
def recover_codes(
    W_hat: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """The codes of a weight already on the grid, ``W_hat = (q - zero_point) * scale``.

    ``quantize`` in bfloat16 does not invert ``dequantize`` at the ends of the int8 range: the
    product ``127 * scale`` is rounded to 8 significant bits and dividing it back can land on
    126.5, which rounds to 126. Dividing in float64 leaves an error below 0.25 of a code for
    every dtype with at least 8 significant bits, so rounding recovers ``q`` exactly. Off-grid
    inputs (a solver's float32 result) are rounded to the nearest code.

    FP8 codes keep the sign of zero: the reference turns a small negative weight into the code
    -0 (``0x80``), whose dequantized value is -0.0; adding the (zero) zero point here would
    turn it into +0, so it is left out (FP8 is symmetric).
    """
    if grid_of(args).is_float:
        zero_point = None
    zero_point = zero_point.to(torch.float64) if zero_point is not None else None
    codes = quantize(W_hat.to(torch.float64), scale.to(torch.float64), zero_point, args)
    return codes


@torch.no_grad()
def loader_stable_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A weight ``x`` in ``dtype`` whose reference fake quantization is ``dequantize(codes)``.

    A ``dense`` checkpoint stores a float weight that the loader fake-quantizes again on every
    forward, in the weight's dtype. ``dequantize(codes)`` itself is not always a fixed point of
    that in bfloat16 (see ``recover_codes``), so entries whose codes would move are nudged one
    representable step at a time towards their code until ``quantize(x) == codes``.

    FP8 needs no nudging: a code has 4 significant bits, so ``q * scale`` rounded to bfloat16
    and divided back stays within 2^-7 of ``q``, far inside half a step of the E4M3 grid.
    That is checked rather than assumed (values compared, so -0 and +0 agree).
    """
    x = dequantize(codes, scale, zero_point, args, dtype)
    if grid_of(args).is_float:
        got = quantize(x, scale, zero_point, args)
        wrong = got.to(torch.float32) != codes.to(torch.float32)
        if bool(wrong.any()):
            raise CalibrationError(
                f"could not find a {dtype} weight that re-quantizes to its FP8 codes "
                f"({int(wrong.sum())} entries differ); save with save_compressed=True"
            )
        return x
    for _ in range(8):
        got = quantize(x, scale, zero_point, args)
        wrong = got != codes
        if not bool(wrong.any()):
            return x
        toward = torch.sign((codes.to(torch.int16) - got.to(torch.int16)).to(x.dtype))
        x = torch.where(wrong, torch.nextafter(x, x + toward * torch.finfo(x.dtype).max), x)
    raise CalibrationError(
        f"could not find a {dtype} weight that re-quantizes to its codes "
        f"({int(wrong.sum())} entries differ); save with save_compressed=True"
    )


def dynamic_activation_fake_quantize(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Fake-quantize a Linear's input with scales computed from ``x`` itself.

    This is what compressed-tensors does in the forward of a module whose
    ``input_activations`` are dynamic, so the in-memory model and the loaded checkpoint compute
    the same thing. ``x: [batch, seq, hidden]``: ``token`` gives one scale per ``[b, s]``
    position; like the reference, a 2-D ``x`` gets a single scale under ``token`` (it only
    keeps dims 0 and 1). ``tensor`` gives one scale; ``group`` one per ``group_size`` slice of
    the last dim.
    """
    if x.numel() == 0:
        return x
    if args.strategy == "token":
        reduce_dims = tuple(range(2, x.ndim))
        if reduce_dims:
            lo = torch.amin(x, dim=reduce_dims, keepdim=True)  # [b, s, 1]
            hi = torch.amax(x, dim=reduce_dims, keepdim=True)
        else:
            lo, hi = torch.aminmax(x)
    elif args.strategy == "tensor":
        lo, hi = torch.aminmax(x)
    elif args.strategy == "group":
        _check_groups(x.shape[-1], args.group_size, tuple(x.shape))
        groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
        lo, hi = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)  # [..., n_groups]
    else:
        raise ArgumentError(
            f"dynamic quantization supports strategies 'token', 'tensor', 'group' "
            f"(got {args.strategy!r})",
            name="strategy",
        )
    scale, zero_point = _qparams_from_range(lo, hi, args)
    xg, scale_g, zero_g = _grouped(x, scale, zero_point, args)
    codes = _codes_as_float(xg, scale_g, zero_g, args)
    return _from_codes(codes, scale_g, zero_g).reshape(x.shape).to(x.dtype)


def static_activation_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantizationArgs
) -> torch.Tensor:
    """Fake-quantize an activation with a scale fixed at calibration (``input_scale``, the
    KV cache's ``k_scale``), as compressed-tensors' forward does with a static module.

    ``scale``/``zero_point`` broadcast against ``x``: ``[1]`` per tensor, ``[heads, 1, 1]``
    per attention head for ``x: [batch, heads, seq, head_dim]``. The rounding is
    ``dynamic_activation_fake_quantize``'s, so only where the scale comes from differs.
    """
    if x.numel() == 0:
        return x
    scale = scale.to(x.device)
    zero_point = zero_point.to(x.device) if zero_point is not None else None
    codes = _codes_as_float(x, scale, zero_point, args)
    return _from_codes(codes, scale, zero_point).to(x.dtype)
