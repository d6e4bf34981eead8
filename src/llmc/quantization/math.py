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
- Block (FP8_BLOCK): one scale per ``[bh, bw]`` tile, ``scale: [ceil(rows/bh), ceil(cols/bw)]``;
  compressed-tensors pads the weight with zeros to whole tiles, which changes no tile's
  min-max (zero is always in range), so the element-wise kernels broadcast each tile's scale.
- Scale dtypes, in compressed-tensors' order (``calculate_qparams``): the symmetric scale
  ``s = max|W| / q_max``, times the global scale ``g`` when there is one, is rounded to FP8
  (``scale_dtype: float8_e4m3fn``, clamped to ±448) or replaced by a power of two (MX,
  ``scale_dtype: uint8``: ``2^(E - 127)`` with the E8M0 exponent ``E`` of ``mx_exponents``); a
  zero scale becomes 0.125 for FP8 scales and 1 for E8M0 ones. With a global scale (NVFP4,
  ``strategy: tensor_group``) codes are computed against ``s / g``, in float32.
- Global scale (NVFP4): ``g = 448 * 6 / max|W|`` over the whole tensor (``global_scale_from_range``),
  so the largest group scale ``g * max|W| / 6`` is FP8's largest value.
"""

from __future__ import annotations

import functools
import math

import torch

from llmc.errors import ArgumentError, CalibrationError
from llmc.quantization.grids import FP4_E2M1, FP8_E4M3, FP8_E4M3_MAX, grid_of
from llmc.quantization.scheme import QuantizationArgs

__all__ = [
    "compute_qparams",
    "dequantize",
    "dynamic_activation_fake_quantize",
    "e8m0_from_float",
    "effective_scale",
    "fake_quantize",
    "global_scale_from_range",
    "loader_stable_weight",
    "mx_exponents",
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
    if args.strategy in ("group", "tensor_group"):
        _check_groups(cols, args.group_size, tuple(weight_shape))
        return (rows, cols // args.group_size)
    if args.strategy == "block":
        block_rows, block_cols = args.block_structure
        return (-(-rows // block_rows), -(-cols // block_cols))
    raise ArgumentError(
        f"strategy {args.strategy!r} has no static scale; per-token scales are computed at run "
        f"time by dynamic_activation_fake_quantize",
        name="strategy",
    )


# floor(log2(largest value)) of each float grid: the E8M0 exponent of a group is that of its
# largest magnitude minus this, so the group's largest code lands in the grid's top binade.
_MX_EXPONENT_OFFSET = {4: 2, 6: 2, 8: 8}
_E8M0_BIAS = 127


def mx_exponents(max_abs: torch.Tensor, num_bits: int) -> torch.Tensor:
    """E8M0 exponents (biased by 127, int32 in [0, 255]) of groups with largest magnitude
    ``max_abs``, as compressed-tensors' ``generate_mx_scales`` computes them.

    The magnitude is first rounded to a power of two, upwards only when its mantissa is within
    half a step of the element format's mantissa (1 bit for FP4/FP8, 3 bits for FP6) of the
    next power: ``f >= 1 - 2^-(m+2)`` for ``max_abs = f * 2^e``, ``f`` in [0.5, 1). A zero
    group gets exponent 0 (scale 2^-127). The reference rounds on the bits of ``max_abs``'s own
    dtype, where a subnormal has no exponent: it becomes that dtype's smallest normal number
    when it is within the same half step of it, else zero (exponent 0); that matters for
    float16 groups below 2^-14.
    """
    mantissa = 3 if num_bits == 6 else 1
    fraction, exponent = torch.frexp(max_abs.to(torch.float32))
    exponent = exponent - 1 + (fraction >= 1 - 2.0 ** -(mantissa + 2)).to(exponent.dtype)
    tiny = torch.finfo(max_abs.dtype).tiny
    exponent = torch.where(max_abs < tiny, int(math.log2(tiny)), exponent)
    nonzero = max_abs >= tiny * (1 - 2.0 ** -(mantissa + 1))
    biased = exponent + (_E8M0_BIAS - _MX_EXPONENT_OFFSET[num_bits])
    return torch.where(nonzero, biased, 0).clamp_(0, 255)


def _e8m0_to_float(biased: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^(E - 127)`` in ``dtype`` (via float32, as the reference computes it)."""
    return torch.exp2((biased.to(torch.int32) - _E8M0_BIAS).to(torch.float32)).to(dtype)


def e8m0_from_float(scale: torch.Tensor) -> torch.Tensor:
    """The uint8 E8M0 byte ``127 + log2(scale)`` of power-of-two scales (as MX checkpoints
    store them; the inverse of the float scales llmc keeps in memory)."""
    return (_E8M0_BIAS + torch.floor(torch.log2(scale.to(torch.float32))).to(torch.int32)).to(torch.uint8)


def global_scale_from_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 ``[1]`` global scale ``448 * 6 / max(|lo|, |hi|)`` (``generate_gparam``).

    Computed in the dtype of ``lo``/``hi`` and then cast to float32, as the reference does;
    an all-zero tensor (or a NaN/inf result) gives 1.0. ``lo``/``hi`` are the tensor's (or,
    for activations, the observed) minimum and maximum, any shape.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    max_abs = torch.maximum(lo.abs(), hi.abs())
    max_abs = torch.clamp(max_abs, min=torch.finfo(max_abs.dtype).tiny)
    scale = (FP8_E4M3_MAX * FP4_E2M1.q_max) / max_abs
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.to(torch.float32).reshape(1)


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale codes are computed against: ``scale / global_scale`` (float32) under NVFP4."""
    return scale if global_scale is None else scale / global_scale


def _stored_scale(
    scale: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """Steps 2-5 of the reference's ``calculate_qparams``: global scale, FP8 rounding of the
    scale, and the replacement of zero scales."""
    if global_scale is not None:
        scale = global_scale * scale  # float32
    if args.scale_dtype == "float8_e4m3fn":
        scale = scale.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_E4M3).to(scale.dtype)
        eps = 0.125
    elif args.scale_dtype == "uint8":
        eps = 1.0
    else:
        eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)


def _scaled_float_qparams(
    max_abs: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the float formats with a scale dtype (MX, NVFP4)."""
    dtype = max_abs.dtype
    if args.is_mx:
        scale = _e8m0_to_float(mx_exponents(max_abs, args.num_bits), dtype)
    else:
        levels = torch.tensor(float(args.q_max - args.q_min)).to(dtype)
        scale = max_abs / (levels / 2)
    scale = _stored_scale(scale, args, global_scale)
    zero_point = torch.zeros(scale.shape, dtype=args.zero_point_dtype)
    if scale.ndim == 0:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return scale, zero_point


def _qparams_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    args: QuantizationArgs,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` from observed minima and maxima of the same shape."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if args.scale_dtype is not None or global_scale is not None:
        return _scaled_float_qparams(torch.maximum(lo.abs(), hi.abs()), args, global_scale)
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


def _block_range(W: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile minima and maxima ``[ceil(rows/bh), ceil(cols/bw)]``, the weight zero-padded
    to whole tiles as the reference pads it."""
    block_rows, block_cols = args.block_structure
    n_rows, n_cols = qparam_shape(W.shape, args)
    padded = torch.nn.functional.pad(
        W, (0, n_cols * block_cols - W.shape[1], 0, n_rows * block_rows - W.shape[0])
    )
    tiles = padded.reshape(n_rows, block_rows, n_cols, block_cols)
    return torch.amin(tiles, dim=(1, 3)), torch.amax(tiles, dim=(1, 3))


@torch.no_grad()
def compute_qparams(
    W: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` of ``W: [rows, cols]`` for a static strategy.

    ``scale`` has ``W``'s dtype (compressed-tensors creates the checkpoint parameter in the
    weight's dtype, so computing in another dtype would not survive a round trip), except under
    a ``global_scale`` (NVFP4: float32, FP8 values, exact in any weight dtype); see the module
    docstring for the formulas and shapes.
    """
    if W.ndim != 2:
        raise ArgumentError(
            f"compute_qparams expects a 2-D weight [rows, cols] (got shape {list(W.shape)})",
            name="W",
        )
    qparam_shape(W.shape, args)  # validates strategy and group divisibility
    if args.has_global_scale and global_scale is None:
        raise ArgumentError(
            "strategy 'tensor_group' (NVFP4) needs the tensor's global_scale; compute it with "
            "global_scale_from_range",
            name="global_scale",
        )
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(W)
    elif args.strategy == "channel":
        lo, hi = torch.aminmax(W, dim=1, keepdim=True)  # [rows, 1]
    elif args.strategy == "block":
        lo, hi = _block_range(W, args)  # [row blocks, col blocks]
    else:
        groups = W.unflatten(-1, (W.shape[-1] // args.group_size, args.group_size))
        lo, hi = torch.aminmax(groups, dim=-1)  # [rows, n_groups]
    return _qparams_from_range(lo, hi, args, global_scale)


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
        # Block scales have a row per block of rows: pieces are whole blocks, scales sliced
        # by block.
        block_rows = args.block_structure[0] if args.strategy == "block" else 1
        step = max(block_rows, step // block_rows * block_rows)
        if not rows or rows <= step:
            return kernel(W, scale, zero_point, args, *rest, **kwargs)

        def part(tensor, piece):  # noqa: ANN001, ANN202
            if block_rows > 1 and tensor is not None and tensor.ndim == 2:
                return tensor[piece.start // block_rows : -(-piece.stop // block_rows)]
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
    if args.strategy == "block":
        return W, _tile(scale, W.shape, args), _tile(zero_point, W.shape, args)
    if args.strategy not in ("group", "tensor_group"):
        return W, scale, zero_point
    _check_groups(W.shape[-1], args.group_size, tuple(W.shape))
    n_groups = W.shape[-1] // args.group_size
    W = W.unflatten(-1, (n_groups, args.group_size))  # [..., n_groups, group_size]
    scale = scale.unsqueeze(-1)  # [..., n_groups, 1]
    if zero_point is not None:
        zero_point = zero_point.unsqueeze(-1)
    return W, scale, zero_point


def _tile(
    per_block: torch.Tensor | None, shape: torch.Size, args: QuantizationArgs
) -> torch.Tensor | None:
    """A ``[row blocks, col blocks]`` tensor repeated to one value per element of ``shape``."""
    if per_block is None:
        return None
    if per_block.dtype == FP8_E4M3:  # no repeat_interleave for FP8 on CPU: tile its bytes
        return _tile(per_block.view(torch.uint8), shape, args).view(FP8_E4M3)
    block_rows, block_cols = args.block_structure
    rows, cols = shape
    return per_block.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


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
    126.5, which rounds to 126. Dividing in float32 leaves only the product's own rounding
    (at most 2^-8 of the value for 8 significant bits: under half a code up to |q| = 127, the
    range of every grid llmc writes), so rounding recovers ``q`` exactly; float64 would add
    nothing but memory traffic. Off-grid inputs (a solver's float32 result) are rounded to the
    nearest code.

    FP8 codes keep the sign of zero: the reference turns a small negative weight into the code
    -0 (``0x80``), whose dequantized value is -0.0; adding the (zero) zero point here would
    turn it into +0, so it is left out (FP8 is symmetric).
    """
    grid = grid_of(args)
    if grid.is_float:
        zero_point = None
    wide = torch.float64 if W_hat.dtype == torch.float64 else torch.float32
    zero_point = zero_point.to(wide) if zero_point is not None else None
    codes = quantize(W_hat.to(wide), scale.to(wide), zero_point, args)
    if grid.negative_zero_input_to_positive:
        # FP4 rounding makes an input of exactly -0.0 +0; a -0.0 weight came from a small
        # negative value, whose code is -0 (sign bit set in the packed nibble).
        codes = torch.where(codes == 0, torch.copysign(torch.zeros_like(codes), W_hat.to(codes.dtype)), codes)
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


def dynamic_activation_fake_quantize(
    x: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize a Linear's input with scales computed from ``x`` itself.

    This is what compressed-tensors does in the forward of a module whose
    ``input_activations`` are dynamic, so the in-memory model and the loaded checkpoint compute
    the same thing. ``x: [batch, seq, hidden]``: ``token`` gives one scale per ``[b, s]``
    position; like the reference, a 2-D ``x`` gets a single scale under ``token`` (it only
    keeps dims 0 and 1). ``tensor`` gives one scale; ``group`` (and ``tensor_group``, NVFP4's
    ``dynamic: local``, under the static ``global_scale``) one per ``group_size`` slice of the
    last dim, MX scales when the arguments say so.
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
    elif args.strategy in ("group", "tensor_group"):
        _check_groups(x.shape[-1], args.group_size, tuple(x.shape))
        groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
        lo, hi = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)  # [..., n_groups]
    else:
        raise ArgumentError(
            f"dynamic quantization supports strategies 'token', 'tensor', 'group' "
            f"(got {args.strategy!r})",
            name="strategy",
        )
    scale, zero_point = _qparams_from_range(lo, hi, args, global_scale)
    scale = effective_scale(scale, global_scale)
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
