"""llmc's quantization math must equal compressed-tensors' bit for bit, since transformers and
vLLM rebuild our checkpoints with compressed-tensors' code; and the scheme classes must refuse
what cannot be saved with messages that say what to change.

FP8 codes are compared as their bytes (``_bits``): torch has no ``equal`` for float8 on CPU,
and the bytes also tell -0 (0x80) from +0."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs as CTArgs
from compressed_tensors.quantization import QuantizationScheme as CTScheme
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as CT_PRESET_SCHEMES
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmc.errors import ArgumentError, CalibrationError
from llmc.quantization import (
    PRESET_ALIASES,
    PRESET_SCHEMES,
    UNSUPPORTED_PRESETS,
    QuantizationArgs,
    QuantizationScheme,
    compute_qparams,
    dequantize,
    dynamic_activation_fake_quantize,
    fake_quantize,
    loader_stable_weight,
    preset_scheme,
    quantize,
    recover_codes,
    scheme_from_config_dict,
    schemes_from_config_groups,
)
from llmc.quantization.grids import FP8_E4M3, grid_of


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor ``torch.equal`` can compare: FP8 codes as their bytes."""
    return t.view(torch.uint8) if t.dtype == FP8_E4M3 else t


def _values(t: torch.Tensor) -> torch.Tensor:
    """Codes as numbers (FP8 -0 and +0 compare equal)."""
    return t.to(torch.float32) if t.dtype == FP8_E4M3 else t


def _ct_args(args: QuantizationArgs) -> CTArgs:
    return CTArgs.model_validate(args.to_config_dict())


def _ct_minmax(W: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max observation llm-compressor makes before calling calculate_qparams."""
    if args.strategy == "tensor":
        return W.amin(), W.amax()
    if args.strategy == "channel":
        return W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True)
    if args.strategy == "block":  # zero-padded to whole tiles, as the reference pads
        (bh, bw), (rows, cols) = args.block_structure, W.shape
        padded = torch.nn.functional.pad(W, (0, -cols % bw, 0, -rows % bh))
        tiles = padded.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))  # [nr, bh, nc, bw]
        return tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    groups = W.unflatten(-1, (W.shape[1] // args.group_size, args.group_size))
    return groups.amin(dim=-1), groups.amax(dim=-1)


def _weights(seed: int, dtype: torch.dtype, rows: int = 48, cols: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator) * 0.05
    W[0, :] = W[0, :].abs()  # a row with no negative value: zero must still be in range
    W[1, :] = 0.0  # an all-zero row (zero scale)
    W[2, :128] = 0.0  # an all-zero group
    W[3, 5] = 4.0  # an outlier
    return W.to(dtype)


# The presets with scales in the weight's dtype; those with FP8 or E8M0 scales (NVFP4, MX)
# are checked in test_float_formats.py.
ARGS_CASES = {
    **{
        f"preset-{name}": scheme.weights
        for name, scheme in PRESET_SCHEMES.items()
        if scheme.weights.scale_dtype is None
    },
    "int4-channel-sym": QuantizationArgs(num_bits=4, strategy="channel"),
    "int4-channel-asym": QuantizationArgs(num_bits=4, strategy="channel", symmetric=False),
    "int4-tensor-sym": QuantizationArgs(num_bits=4, strategy="tensor"),
    "int8-tensor-asym": QuantizationArgs(num_bits=8, strategy="tensor", symmetric=False),
    "int8-group64-asym": QuantizationArgs(
        num_bits=8, strategy="group", group_size=64, symmetric=False
    ),
    "int3-group32-asym": QuantizationArgs(
        num_bits=3, strategy="group", group_size=32, symmetric=False
    ),
    "int3-group64-sym": QuantizationArgs(num_bits=3, strategy="group", group_size=64),
    "int2-group32-sym": QuantizationArgs(num_bits=2, strategy="group", group_size=32),
    "fp8-tensor": QuantizationArgs(num_bits=8, type="float", strategy="tensor"),
    "fp8-channel": QuantizationArgs(num_bits=8, type="float", strategy="channel"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("args", ARGS_CASES.values(), ids=ARGS_CASES.keys())
def test_compute_qparams_equals_compressed_tensors(args: QuantizationArgs, dtype: torch.dtype):
    W = _weights(0, dtype)
    scale, zero_point = compute_qparams(W, args)
    ct_scale, ct_zero_point = calculate_qparams(*_ct_minmax(W, args), _ct_args(args))
    assert scale.dtype == dtype == ct_scale.dtype
    assert zero_point.dtype == grid_of(args).zero_point_dtype == ct_zero_point.dtype
    assert torch.equal(scale, ct_scale)
    assert torch.equal(_bits(zero_point), _bits(ct_zero_point))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("args", ARGS_CASES.values(), ids=ARGS_CASES.keys())
def test_quantize_and_fake_quantize_equal_compressed_tensors(
    args: QuantizationArgs, dtype: torch.dtype
):
    W = _weights(1, dtype)
    scale, zero_point = compute_qparams(W, args)
    ct_args = _ct_args(args)
    codes = quantize(W, scale, zero_point, args)
    code_dtype = grid_of(args).code_dtype  # int8, or float8_e4m3fn
    assert codes.dtype == code_dtype
    assert torch.equal(_bits(codes), _bits(ct_quantize(W, scale, zero_point, ct_args, dtype=code_dtype)))
    fake = fake_quantize(W, scale, zero_point, args)
    assert fake.dtype == dtype
    assert torch.equal(fake, ct_fake_quantize(W, scale, zero_point, ct_args))
    assert torch.equal(dequantize(codes, scale, zero_point, args, dtype), fake)


ACTIVATION_CASES = {
    "int8-token-sym": QuantizationArgs(num_bits=8, strategy="token", dynamic=True),
    "int8-token-asym": QuantizationArgs(
        num_bits=8, strategy="token", dynamic=True, symmetric=False
    ),
    "int8-tensor-sym": QuantizationArgs(num_bits=8, strategy="tensor", dynamic=True),
    "int4-group32-sym": QuantizationArgs(num_bits=4, strategy="group", group_size=32, dynamic=True),
    "fp8-token-sym": QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True),
    "fp8-tensor-sym": QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=True),
}


@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 64)], ids=["3d", "2d"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("args", ACTIVATION_CASES.values(), ids=ACTIVATION_CASES.keys())
def test_dynamic_activation_fake_quantize_equals_compressed_tensors(
    args: QuantizationArgs, dtype: torch.dtype, shape: tuple[int, ...]
):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    ct_args = _ct_args(args)
    scale, zero_point = compute_dynamic_scales_and_zp(x, ct_args, module=None)
    expected = ct_fake_quantize(x, scale, zero_point, ct_args)
    assert torch.equal(dynamic_activation_fake_quantize(x, args), expected)


def test_compute_qparams_group_size_not_dividing_raises():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=128)
    with pytest.raises(
        CalibrationError,
        match=r"group_size 128 does not divide the input width 200 of a tensor of shape "
        r"\[4, 200\]; choose a group_size that divides 200",
    ):
        compute_qparams(torch.randn(4, 200), args)


def test_fake_quantize_group_size_not_dividing_raises():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=64)
    scale = torch.ones(4, 2)
    with pytest.raises(CalibrationError, match=r"group_size 64 does not divide .* 100"):
        fake_quantize(torch.randn(4, 100), scale, torch.zeros(4, 2, dtype=torch.int8), args)


# -- properties ---------------------------------------------------------------------------

PROPERTY_ARGS = [
    QuantizationArgs(num_bits=bits, strategy=strategy, group_size=group, symmetric=symmetric)
    for bits in (2, 3, 4, 8)
    for strategy, group in (("tensor", None), ("channel", None), ("group", 16))
    for symmetric in (True, False)
] + [
    QuantizationArgs(num_bits=8, type="float", strategy=strategy)
    for strategy in ("tensor", "channel")
]


@st.composite
def weights_and_args(draw):
    args = draw(st.sampled_from(PROPERTY_ARGS))
    rows = draw(st.integers(1, 6))
    cols = 16 * draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = draw(
        arrays(
            np.float32,
            (rows, cols),
            elements=st.floats(-1, 1, width=32, allow_nan=False, allow_subnormal=False),
        )
    )
    zeros = draw(arrays(np.bool_, (rows, cols)))
    W = torch.from_numpy(values) * magnitude
    W[torch.from_numpy(zeros)] = 0.0
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    return W.to(dtype), torch.from_numpy(zeros), args


@settings(max_examples=150, deadline=None)
@given(weights_and_args())
def test_quantize_codes_lie_in_range(case):
    W, _, args = case
    scale, zero_point = compute_qparams(W, args)
    codes = _values(quantize(W, scale, zero_point, args))
    zero_point = _values(zero_point)
    assert codes.min() >= args.q_min and codes.max() <= args.q_max
    assert zero_point.min() >= args.q_min and zero_point.max() <= args.q_max


@settings(max_examples=150, deadline=None)
@given(weights_and_args())
def test_fake_quantize_is_idempotent(case):
    W, _, args = case
    if W.dtype == torch.bfloat16 and args.num_bits == 8 and args.type == "int":
        return  # not a fixed point at the ends of the range: see the bf16 tests below
    scale, zero_point = compute_qparams(W, args)
    once = fake_quantize(W, scale, zero_point, args)
    assert torch.equal(fake_quantize(once, scale, zero_point, args), once)
    assert torch.equal(
        _values(quantize(once, scale, zero_point, args)),
        _values(quantize(W, scale, zero_point, args)),
    )


@settings(max_examples=150, deadline=None)
@given(weights_and_args())
def test_recover_codes_inverts_fake_quantize_in_every_dtype(case):
    W, _, args = case
    scale, zero_point = compute_qparams(W, args)
    codes = quantize(W, scale, zero_point, args)
    W_hat = fake_quantize(W, scale, zero_point, args)
    assert torch.equal(_bits(recover_codes(W_hat, scale, zero_point, args)), _bits(codes))


@settings(max_examples=150, deadline=None)
@given(weights_and_args())
def test_loader_stable_weight_requantizes_to_its_codes(case):
    W, _, args = case
    scale, zero_point = compute_qparams(W, args)
    codes = quantize(W, scale, zero_point, args)
    x = loader_stable_weight(codes, scale, zero_point, args, W.dtype)
    assert torch.equal(_values(quantize(x, scale, zero_point, args)), _values(codes))
    assert torch.equal(
        fake_quantize(x, scale, zero_point, args), fake_quantize(W, scale, zero_point, args)
    )


def test_fake_quantize_bf16_int8_is_not_idempotent_but_codes_recover():
    """The reference's own arithmetic: 127 * scale rounded to bf16, divided back, gives 126.5."""
    args = QuantizationArgs(num_bits=8, strategy="tensor")
    W = torch.full((1, 16), 0.1875, dtype=torch.bfloat16)
    scale, zero_point = compute_qparams(W, args)
    W_hat = fake_quantize(W, scale, zero_point, args)
    ct_twice = ct_fake_quantize(W_hat, scale, zero_point, _ct_args(args))
    assert not torch.equal(ct_twice, W_hat)
    assert torch.equal(fake_quantize(W_hat, scale, zero_point, args), ct_twice)
    assert torch.equal(
        recover_codes(W_hat, scale, zero_point, args), torch.full((1, 16), 127, dtype=torch.int8)
    )
    x = loader_stable_weight(
        recover_codes(W_hat, scale, zero_point, args), scale, zero_point, args, torch.bfloat16
    )
    assert torch.equal(ct_fake_quantize(x, scale, zero_point, _ct_args(args)), W_hat)


@settings(max_examples=150, deadline=None)
@given(weights_and_args())
def test_fake_quantize_keeps_zero_exact(case):
    W, zeros, args = case
    scale, zero_point = compute_qparams(W, args)
    fake = fake_quantize(W, scale, zero_point, args)
    assert torch.all(fake[zeros] == 0)


# -- schemes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_bits": 9, "strategy": "channel"},
            r"^'num_bits' must be one of 2, 3, 4, 5, 6, 7, 8 \(got 9\)$",
        ),
        (
            {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16},
            r"^type 'float' with 4 bits needs MX scales \(strategy 'group', group_size 32, "
            r"scale_dtype uint8: MXFP4/MXFP6\) or NVFP4's \(strategy 'tensor_group', group_size "
            r"16, scale_dtype float8_e4m3fn\) \(got strategy 'group', scale_dtype None\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False},
            r"^type 'float' with 8 bits must be symmetric \(got symmetric false\): "
            r"compressed-tensors and vLLM have no float zero points; set symmetric true$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128},
            r"^FP8 weight groups need E8M0 scales \(MXFP8: group_size 32, scale_dtype uint8\) "
            r"\(got group_size 128, scale_dtype None\); groups with float scales are for dynamic "
            r"input activations$",
        ),
        (
            {"num_bits": 8, "type": "fp8", "strategy": "channel"},
            r"^'type' must be one of 'int', 'float' \(got 'fp8'\)$",
        ),
        (
            {"num_bits": 4, "strategy": "blocks"},
            r"^'strategy' must be one of 'tensor', 'channel', 'group', 'block', 'token', "
            r"'tensor_group', 'attn_head' \(got 'blocks'\)$",
        ),
        (
            {"num_bits": 4, "strategy": "group"},
            r"^'group_size' is required when strategy is 'group' \(got None\)",
        ),
        (
            {"num_bits": 4, "strategy": "channel", "group_size": 128},
            r"^'group_size' must be None unless strategy is 'group' \(got group_size 128 with "
            r"strategy 'channel'\)$",
        ),
        (
            {"num_bits": 4, "strategy": "group", "group_size": 0},
            r"^'group_size' must be a positive integer or None \(got 0\)$",
        ),
        ({"num_bits": 8, "strategy": "token"}, r"^strategy 'token' needs dynamic true"),
        (
            {"num_bits": 4, "strategy": "channel", "symmetric": "yes"},
            r"^'symmetric' must be true or false \(got 'yes'\)$",
        ),
        (
            {"num_bits": 4, "strategy": "channel", "actorder": "group"},
            r"^'actorder' 'group' is not supported: .* use actorder 'weight'",
        ),
    ],
    ids=[
        "num-bits",
        "float-4-bits",
        "float-asymmetric",
        "float-group",
        "type",
        "strategy",
        "group-size-missing",
        "group-size-unexpected",
        "group-size-zero",
        "static-token",
        "symmetric-type",
        "actorder-group",
    ],
)
def test_quantization_args_invalid_raises(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        QuantizationArgs(**kwargs)


def test_quantization_args_static_actorder_is_weight():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=128, actorder="static")
    assert args.actorder == "weight"


def test_quantization_scheme_static_inputs_other_than_tensor_raise():
    with pytest.raises(
        ArgumentError,
        match=r"^static 'input_activations' \(dynamic false\) support strategy 'tensor' \(got 'group'\)",
    ):
        QuantizationScheme(
            weights=QuantizationArgs(num_bits=8, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, strategy="group", group_size=32),
        )


def test_preset_scheme_unknown_raises_with_closest():
    with pytest.raises(
        ArgumentError,
        match=r"^unknown quantization scheme 'W4A61'; did you mean 'W4A16', 'W4A8' or "
        r"'W4A4'\?$",
    ):
        preset_scheme("W4A61", ["Linear"])
    with pytest.raises(
        ArgumentError, match=r"^unknown quantization scheme 'fp8_dynamc'; did you mean 'FP8_DYNAMIC' or 'FP8_BLOCK'\?$"
    ):
        preset_scheme("fp8_dynamc", ["Linear"])
    with pytest.raises(
        ArgumentError,
        match=r"^unknown quantization scheme 'XYZ'; supported presets: FP8, FP8_BLOCK, FP8_DYNAMIC, "
        r"INT8, MXFP4, MXFP4A16, MXFP4XFP8, MXFP6A16, MXFP6A8, MXFP8, MXFP8A16, NVFP4, NVFP4A16, W2A16, "
        r".*, W8A16, W8A8$",
    ):
        preset_scheme("XYZ", ["Linear"])


def test_preset_names_cover_compressed_tensors_presets():
    """Every preset of the installed compressed-tensors is either produced or refused by name."""
    ours = {*PRESET_SCHEMES, *PRESET_ALIASES}
    assert not ours & set(UNSUPPORTED_PRESETS)
    assert ours | set(UNSUPPORTED_PRESETS) == set(CT_PRESET_SCHEMES)


# compressed-tensors' presets leave the weight observer unset (None means min-max for static
# weights); llm-compressor writes "minmax" into the checkpoint, and so do we.
SAME_AS_COMPRESSED_TENSORS = [
    "FP8", "FP8_DYNAMIC", "W4A16_ASYM", "W8A8", "INT8", "W4AFP8", "FP8_BLOCK", "NVFP4A16", "NVFP4",
    "MXFP4A16", "MXFP4", "MXFP4XFP8", "MXFP6A16", "MXFP6A8", "MXFP8A16", "MXFP8",
    *(f"W{bits}A16" for bits in range(2, 9)),
    *(f"W{bits}A8" for bits in range(2, 8)),
    *(f"W{bits}A4" for bits in range(2, 5)),
]


@pytest.mark.parametrize("name", SAME_AS_COMPRESSED_TENSORS, ids=str)
def test_preset_equals_compressed_tensors_preset(name):
    ours = CTScheme.model_validate(preset_scheme(name, ["Linear"]).to_config_dict()).model_dump()
    theirs = preset_name_to_scheme(name, ["Linear"]).model_dump()
    assert ours["weights"].pop("observer") == "minmax"
    assert theirs["weights"].pop("observer", None) is None
    assert ours == theirs


def test_preset_scheme_is_case_insensitive_and_sets_targets():
    scheme = preset_scheme("w4a16", ["re:.*mlp.*"])
    assert scheme.targets == ("re:.*mlp.*",)
    assert scheme.weights == PRESET_SCHEMES["W4A16"].weights


@pytest.mark.parametrize("name", PRESET_SCHEMES, ids=str)
def test_preset_to_config_dict_is_valid_compressed_tensors(name):
    """The JSON we write must parse as compressed-tensors' own scheme, with the same meaning."""
    scheme = PRESET_SCHEMES[name]
    ct_scheme = CTScheme.model_validate(scheme.to_config_dict())
    assert ct_scheme.weights.num_bits == scheme.weights.num_bits
    assert ct_scheme.weights.strategy == scheme.weights.strategy
    assert ct_scheme.weights.symmetric == scheme.weights.symmetric
    assert ct_scheme.weights.group_size == scheme.weights.group_size
    assert scheme_from_config_dict(scheme.to_config_dict()) == scheme


def test_scheme_from_config_dict_reads_llm_compressor_group():
    scheme = scheme_from_config_dict(
        {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
            },
        }
    )
    assert scheme == PRESET_SCHEMES["W4A16"]


def test_scheme_from_config_dict_infers_strategy_from_group_size():
    scheme = scheme_from_config_dict(
        {"targets": ["Linear"], "weights": {"num_bits": 8, "group_size": -1}}
    )
    assert scheme.weights.strategy == "channel"
    assert scheme.weights.group_size is None


def test_scheme_from_config_dict_unknown_key_raises_with_closest():
    with pytest.raises(
        ArgumentError, match=r"^unknown key 'weight' in config group; did you mean 'weights'\?$"
    ):
        scheme_from_config_dict({"targets": ["Linear"], "weight": {"num_bits": 4}})
    with pytest.raises(
        ArgumentError, match=r"^unknown key 'groupsize' in 'weights'; did you mean 'group_size'\?$"
    ):
        scheme_from_config_dict({"targets": ["Linear"], "weights": {"groupsize": 4}})


def test_schemes_from_config_groups_accepts_preset_names():
    schemes = schemes_from_config_groups({"W8A8": ["Linear"]})
    assert schemes["W8A8"] == PRESET_SCHEMES["W8A8"]


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_scheme_from_config_dict_reads_fp8_weights(strategy):
    scheme = scheme_from_config_dict(
        {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True},
        }
    )
    assert scheme.weights == QuantizationArgs(num_bits=8, type="float", strategy=strategy)
    assert scheme.input_activations is None


def test_scheme_from_config_dict_reads_compressed_tensors_fp8_dynamic_group():
    """The config group compressed-tensors writes for FP8_DYNAMIC reads back as our preset."""
    entry = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).model_dump()
    entry["weights"]["zp_dtype"] = "torch.float8_e4m3fn"  # as written for asymmetric schemes
    scheme = scheme_from_config_dict(entry)
    assert scheme.weights == PRESET_SCHEMES["FP8_DYNAMIC"].weights
    expected_inputs = PRESET_SCHEMES["FP8_DYNAMIC"].input_activations
    assert scheme.input_activations == attrs.evolve(expected_inputs, observer="minmax")


@pytest.mark.parametrize(
    ("weights", "inputs", "message"),
    [
        (
            dict(num_bits=4, strategy="group", group_size=128),
            dict(num_bits=3, strategy="token", dynamic=True),
            r"^integer input activations take num_bits 4 or 8 \(got 3\); runtimes have no "
            r"3-bit activation kernels$",
        ),
        (
            dict(num_bits=8, type="float", strategy="channel"),
            dict(num_bits=8, strategy="token", dynamic=True),
            r"^float weights with int input activations have no compressed-tensors format; ",
        ),
    ],
    ids=["int-inputs-width", "fp8-weights-int-inputs"],
)
def test_scheme_input_activations_without_a_format_raise(weights, inputs, message):
    with pytest.raises(ArgumentError, match=message):
        QuantizationScheme(
            weights=QuantizationArgs(**weights), input_activations=QuantizationArgs(**inputs)
        )


def test_args_from_config_dict_wrong_fp8_zp_dtype_raises():
    with pytest.raises(
        ArgumentError,
        match=r"^'weights.zp_dtype' must be float8_e4m3fn for FP8 quantization \(got 'torch.int8'\)$",
    ):
        scheme_from_config_dict(
            {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "zp_dtype": "torch.int8"},
            }
        )


@pytest.mark.parametrize(
    ("weights", "fmt"),
    [
        ({"num_bits": 8, "type": "float", "strategy": "channel"}, "pack-quantized"),
        ({"num_bits": 8, "type": "float", "strategy": "channel"}, "int-quantized"),
        ({"num_bits": 4, "strategy": "group", "group_size": 128}, "float-quantized"),
    ],
    ids=["fp8-packed", "fp8-int-quantized", "int4-float-quantized"],
)
def test_scheme_format_that_cannot_hold_the_weights_raises(weights, fmt):
    with pytest.raises(ArgumentError, match=rf"^format '{fmt}' cannot hold \w+ weights; use one of "):
        scheme_from_config_dict({"targets": ["Linear"], "weights": weights, "format": fmt})


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC"])
def test_kernels_by_pieces_of_rows_equal_the_whole_weight(monkeypatch, scheme):
    """Large weights are quantized a few rows at a time; the codes and values must not change."""
    from llmc.quantization import math as qmath
    from llmc.quantization.scheme import preset_scheme

    args = preset_scheme(scheme).weights
    W = (torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    scale, zero_point = qmath.compute_qparams(W, args)
    whole = {
        "fake": qmath.fake_quantize(W, scale, zero_point, args),
        "codes": qmath.quantize(W, scale, zero_point, args),
    }
    whole["recovered"] = qmath.recover_codes(whole["fake"], scale, zero_point, args)
    whole["values"] = qmath.dequantize(whole["codes"], scale, zero_point, args, torch.bfloat16)
    monkeypatch.setattr(qmath, "_PIECE_ELEMENTS", 256 * 7)  # 7 rows a piece, a ragged last one
    pieces = {
        "fake": qmath.fake_quantize(W, scale, zero_point, args),
        "codes": qmath.quantize(W, scale, zero_point, args),
    }
    pieces["recovered"] = qmath.recover_codes(pieces["fake"], scale, zero_point, args)
    pieces["values"] = qmath.dequantize(pieces["codes"], scale, zero_point, args, torch.bfloat16)
    for key, value in whole.items():
        assert value.dtype == pieces[key].dtype
        assert torch.equal(value.view(torch.uint8) if value.element_size() == 1 else value, pieces[key].view(torch.uint8) if value.element_size() == 1 else pieces[key]), key
