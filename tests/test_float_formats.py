"""FP4/FP6/FP8 grids with E8M0 (MX), FP8 (NVFP4) and 128x128 block scales, against
compressed-tensors' own code at every step.

The oracles: compressed-tensors' ``cast_to_fp4``/``cast_to_fp6`` for the rounding (compared as
bits, so ties and the sign of zero count), its FP4/FP6 packers, ``generate_mx_scales``,
``generate_gparam`` and ``calculate_qparams`` for the scales, ``quantize``/``fake_quantize`` for
the codes and the in-memory weight, its dynamic activation path for the input hook, its
``ModelCompressor`` for the checkpoint tensors, and transformers' loader for the round trip.

Measured once by hand (not in CI, it needs llm-compressor 0.14's own environment): the
checkpoints of these presets on ``llmc:tiny-llama``, in float32 and bfloat16, are byte for byte
llm-compressor's (``QuantizationModifier(targets="Linear", scheme=..., ignore=["lm_head"])``),
fused q/k/v and gate/up global scales included.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8, unpack_fp6_from_uint8
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.quantization import QuantizationScheme as CTScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.fp6_utils import cast_to_fp6
from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.errors import ArgumentError, CalibrationError, SaveError
from llmc.models import resolve_model_path
from llmc.modifiers.quantization import plan_quantization
from llmc.quantization import (
    FP4_E2M1,
    FP6_E2M3,
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    compute_qparams,
    dynamic_activation_fake_quantize,
    effective_scale,
    fake_quantize,
    global_scale_from_range,
    input_global_scale_from_range,
    mx_exponents,
    preset_scheme,
    quantize,
    quantize_linear_,
    quantized_linears,
    scheme_from_config_dict,
    weight_codes,
)
from llmc.quantization.float_packing import pack_float_codes, unpack_float_codes
from llmc.save import compressed_state_dict, quantization_config
from llmc.testing import build_causal_lm, sample_logits

FLOAT_PRESETS = [
    "NVFP4A16", "MXFP4A16", "MXFP4", "MXFP4XFP8", "MXFP6A16", "MXFP6A8", "MXFP8A16", "MXFP8",
    "FP8_BLOCK",
]
FORMATS = {
    "NVFP4A16": "nvfp4-pack-quantized",
    "MXFP4A16": "mxfp4-pack-quantized",
    "MXFP4": "mxfp4-pack-quantized",
    "MXFP4XFP8": "mxfp4-pack-quantized",
    "MXFP6A16": "mxfp6-pack-quantized",
    "MXFP6A8": "mxfp6-pack-quantized",
    "MXFP8A16": "mxfp8-quantized",
    "MXFP8": "mxfp8-quantized",
    "FP8_BLOCK": "float-quantized",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor ``torch.equal`` compares bit for bit (so -0.0 differs from +0.0)."""
    if t.dtype in _INT_VIEW:
        return t.view(_INT_VIEW[t.dtype])
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _ct_args(args: QuantizationArgs):
    return CTScheme.model_validate({"targets": ["Linear"], "weights": args.to_config_dict()}).weights


def _ct_minmax(W: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max observation llm-compressor makes before calling calculate_qparams."""
    if args.strategy == "block":
        (bh, bw), (rows, cols) = args.block_structure, W.shape
        padded = nn.functional.pad(W, (0, -cols % bw, 0, -rows % bh))
        tiles = padded.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))  # [nr, bh, nc, bw]
        return tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    groups = W.unflatten(-1, (-1, args.group_size))  # [rows, n_groups, group_size]
    return groups.amin(dim=-1), groups.amax(dim=-1)


def _weights(seed: int, dtype: torch.dtype, rows: int = 200, cols: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 0.1
    W[0, :8] = -1e-7  # tiny negatives: code -0, the packed sign bit set
    W[1, :8] = -0.0  # exact -0.0: FP4 rounds it to +0
    W[2, :64] = 0.0  # all-zero groups: the zero-scale replacement
    W[3, 5] = 4.0  # an outlier
    return W.to(dtype)


# -- grids and packing -----------------------------------------------------------------------


def _grid_inputs(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ties = torch.arange(-8.0, 8.0001, 1 / 32)  # every midpoint of both grids, and beyond 7.5
    special = torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 5.0, -5.0, 2.5, 0.25, -0.25, 7.25, 7.75])
    return torch.cat([torch.randn(20000, generator=generator) * 3, ties, special]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    ("grid", "reference"), [(FP4_E2M1, cast_to_fp4), (FP6_E2M3, cast_to_fp6)], ids=["fp4", "fp6"]
)
def test_float_grid_rounding_equals_compressed_tensors_bit_for_bit(grid, reference, dtype):
    """Round to nearest even, ties and signs of zero included (FP4 turns an exact -0.0 into
    +0.0, as compressed-tensors' ``sign(x) * |x|`` does; FP6 keeps it)."""
    x = _grid_inputs(dtype)
    ours = grid.round_(x.clone())
    theirs = reference(x.clamp(grid.q_min, grid.q_max).clone())
    assert ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(theirs))


@pytest.mark.parametrize(
    ("grid", "pack", "unpack"),
    [(FP4_E2M1, pack_fp4_to_uint8, unpack_fp4_from_uint8), (FP6_E2M3, pack_fp6_to_uint8, unpack_fp6_from_uint8)],
    ids=["fp4", "fp6"],
)
def test_float_packing_equals_compressed_tensors(grid, pack, unpack):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 3
    x[0, :4] = torch.tensor([-1e-9, 1e-9, -7.0, 7.0])  # -0 and +0 codes, saturation
    codes = grid.round_(x)
    packed = pack_float_codes(codes, grid)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, pack(codes))
    sign_bit = 0x08 if grid is FP4_E2M1 else 0x20  # of element 0: -0, from -1e-9
    assert packed[0, 0] & sign_bit
    assert torch.equal(_bits(unpack_float_codes(packed, grid, 256)), _bits(codes))
    assert torch.equal(unpack(packed, 64, 256, torch.float32), codes)


def test_mx_exponents_equal_generate_mx_scales():
    """Powers of two, values just below the round-up threshold and at it, zero and tiny ones."""
    base = torch.tensor([0.0, 1e-30, 1.0, 1.5, 1.74, 1.75, 1.76, 1.9375, 1.96875, 2.0, 3.0, 448.0])
    values = torch.cat([base, base * 2.0**-20, torch.rand(1000, generator=torch.Generator().manual_seed(2))])
    for dtype in DTYPES.values():
        x = values.to(dtype)
        for num_bits in (4, 6, 8):
            theirs = generate_mx_scales(x, num_bits).clamp(0, 255).round()
            assert torch.equal(mx_exponents(x, num_bits).to(torch.float32), theirs.to(torch.float32))


# -- scales, codes, fake quantization --------------------------------------------------------


def _assert_equal_reference(W: torch.Tensor, args: QuantizationArgs) -> None:
    ct_args = _ct_args(args)
    global_scale = None
    if args.has_global_scale:
        global_scale = global_scale_from_range(*torch.aminmax(W))
        assert torch.equal(global_scale, generate_gparam(*torch.aminmax(W)))
    scale, zero_point = compute_qparams(W, args, global_scale)
    ct_scale, ct_zero_point = calculate_qparams(*_ct_minmax(W, args), ct_args, global_scale=global_scale)
    assert scale.dtype == ct_scale.dtype
    assert torch.equal(_bits(scale), _bits(ct_scale))
    assert not bool(zero_point.to(torch.float32).any()) and not bool(ct_zero_point.to(torch.float32).any())
    stored = scale.to(W.dtype)  # the in-memory parameter, in the weight's dtype (exact)
    assert torch.equal(stored.to(scale.dtype), scale)
    grid_scale = effective_scale(stored, global_scale)
    codes = quantize(W, grid_scale, zero_point, args)
    ct_codes = ct_quantize(W, stored, ct_zero_point, ct_args, global_scale=global_scale)
    assert torch.equal(_bits(codes.to(ct_codes.dtype)), _bits(ct_codes))
    fake = fake_quantize(W, grid_scale, zero_point, args)
    ct_fake = ct_fake_quantize(W, stored, ct_zero_point, ct_args, global_scale=global_scale)
    assert fake.dtype == W.dtype == ct_fake.dtype
    assert torch.equal(_bits(fake), _bits(ct_fake))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16", "MXFP6A16", "MXFP8A16", "FP8_BLOCK"])
def test_float_scales_and_codes_equal_compressed_tensors_on_random_weights(name, dtype):
    """200 rows: FP8_BLOCK's last row block is padded, as compressed-tensors pads it."""
    _assert_equal_reference(_weights(0, dtype), PRESET_SCHEMES[name].weights)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_float_scales_and_codes_equal_compressed_tensors_on_trained_weights(dtype):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for module in linears[:7]:  # one decoder layer: q, k, v (64 rows: a partial block), o, mlp
        W = module.weight.detach().to(dtype)
        for name in ("NVFP4A16", "MXFP4A16", "MXFP6A16", "MXFP8A16", "FP8_BLOCK"):
            _assert_equal_reference(W, PRESET_SCHEMES[name].weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["MXFP4", "MXFP8", "MXFP4XFP8", "FP8_BLOCK"])
def test_dynamic_float_activations_equal_compressed_tensors(name, dtype):
    """MX group-32 and FP8 group-128 input activations, computed as compressed-tensors'
    quantized forward does (``compute_dynamic_scales_and_zp`` then ``fake_quantize``)."""
    args = PRESET_SCHEMES[name].input_activations
    ct_args = CTScheme.model_validate(
        {"targets": ["Linear"], "input_activations": args.to_config_dict()}
    ).input_activations
    x = (torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    x[0, 0, :128] = 0.0  # all-zero groups
    scale, zero_point = compute_dynamic_scales_and_zp(x, ct_args, module=None)
    expected = ct_fake_quantize(x, scale, zero_point, ct_args)
    got = dynamic_activation_fake_quantize(x, args)
    assert torch.equal(_bits(got), _bits(expected))
    assert not torch.equal(got, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nvfp4_local_activations_with_input_global_scale_equal_compressed_tensors(dtype):
    """NVFP4's ``dynamic: local`` inputs: per-group FP8 scales at run time under the static
    ``input_global_scale`` that ``input_global_scale_from_range`` makes from an observed
    min/max (the observer itself comes with calibration); the module's pre-hook uses it."""
    scheme = QuantizationScheme(
        weights=PRESET_SCHEMES["NVFP4A16"].weights,
        input_activations=QuantizationArgs(
            num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local",
            scale_dtype="float8_e4m3fn", observer="static_minmax",
        ),
    )
    ct_args = CTScheme.model_validate(scheme.to_config_dict()).input_activations
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    global_scale = input_global_scale_from_range(x.amin(), x.amax())
    assert torch.equal(global_scale, generate_gparam(x.amin(), x.amax()))
    scale, zero_point = compute_dynamic_scales_and_zp(x, ct_args, module=None, global_scale=global_scale)
    expected = ct_fake_quantize(x, scale, zero_point, ct_args, global_scale=global_scale)
    assert torch.equal(_bits(dynamic_activation_fake_quantize(x, scheme.input_activations, global_scale)), _bits(expected))

    linear = nn.Linear(64, 32).to(dtype)
    quantize_linear_(linear, scheme)
    with pytest.raises(CalibrationError, match=r"need an input_global_scale buffer from calibration"):
        linear(x)
    linear.register_buffer("input_global_scale", global_scale)
    with torch.no_grad():
        assert torch.equal(linear(x), nn.functional.linear(expected, linear.weight, linear.bias))


# -- the quantized module and the checkpoint -------------------------------------------------


def _compressor_state(model: nn.Module, preset: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' ModelCompressor output for ``model`` under ``preset`` with min-max
    scales and (NVFP4) each weight's own global scale."""
    scheme = CTScheme.model_validate(PRESET_SCHEMES[preset].to_config_dict())
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            W = module.weight.detach()
            global_scale = None
            if hasattr(module, "weight_global_scale"):
                global_scale = generate_gparam(*torch.aminmax(W))
                module.weight_global_scale.data = global_scale
            args = module.quantization_scheme.weights
            scale, _ = calculate_qparams(
                *_ct_minmax(W, PRESET_SCHEMES[preset].weights), args, global_scale=global_scale
            )
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
    ModelCompressor.from_pretrained_model(model).compress_model(model)
    return model.state_dict()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP4A16", "MXFP6A16", "MXFP8A16", "FP8_BLOCK"])
def test_float_checkpoint_equals_compressed_tensors_compressor(preset, dtype):
    """Names, dtypes, shapes and bytes of every tensor equal ModelCompressor's for the same
    model (hidden 64: FP8_BLOCK's blocks are all partial)."""
    base = build_causal_lm("llama", hidden=64).to(dtype)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[0, :8] = -1e-7  # -0 codes
        base.model.layers[0].self_attn.q_proj.weight[1, :8] = -0.0  # -0 on FP6, +0 on FP4
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantize_linear_(module, PRESET_SCHEMES[preset])
    state = compressed_state_dict(ours, save_compressed=True)
    expected = _compressor_state(theirs, preset)
    assert set(state) == set(expected)
    for key, tensor in state.items():
        assert (tensor.dtype, tensor.shape) == (expected[key].dtype, expected[key].shape), key
        assert torch.equal(_bits(tensor), _bits(expected[key])), key
    config = quantization_config(ours)
    assert config["format"] == FORMATS[preset]


def test_nvfp4_fused_siblings_share_one_global_scale(tmp_path: Path):
    """q/k/v and gate/up get the global scale of their joint max|W| (vLLM fuses them; so does
    llm-compressor 0.14); o_proj and down_proj keep their own."""
    result = oneshot(model="llmc:tiny-llama", recipe=_recipe("NVFP4A16"))
    original = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    layer, before = result.model.model.layers[1], original.model.layers[1]
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",)):
        absmax = max(before.get_submodule(n).weight.abs().max() for n in group)
        expected = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
        for name in group:
            assert torch.equal(layer.get_submodule(name).weight_global_scale, expected), name


def _recipe(scheme: str | dict) -> dict:
    return {
        "quant_stage": {
            "quant_modifiers": {
                "QuantizationModifier": {"scheme": scheme, "targets": ["Linear"], "ignore": ["lm_head"]}
            }
        }
    }


@pytest.mark.parametrize("preset", FLOAT_PRESETS)
def test_float_preset_oneshot_round_trip_through_transformers(preset, tmp_path: Path):
    """``oneshot`` in bfloat16, then transformers + compressed-tensors load the checkpoint and
    compute the in-memory model's logits and weights exactly.

    In bfloat16 because compressed-tensors decompresses FP4/FP6 and MX weights to bfloat16
    whatever the model's dtype (a float32 model then fails in its first matmul), so only a
    bfloat16 model loads these formats on CPU.
    """
    result = oneshot(
        model="llmc:tiny-llama", precision="bfloat16", recipe=_recipe(preset),
        output_dir=str(tmp_path / "out"),
    )
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == FORMATS[preset]
    assert config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert scheme_from_config_dict(group) == attrs.evolve(preset_scheme(preset), format=FORMATS[preset])

    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.bfloat16)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))
    quantized = dict(quantized_linears(result.model))
    assert len(quantized) == 4 * 7
    for name, module in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, module.weight), name


def test_fp8_block_round_trip_in_float32(tmp_path: Path):
    """FP8_BLOCK decompresses to the model's dtype, so a float32 checkpoint loads as well; the
    64-row k/v projections have one partial row block."""
    result = oneshot(model="llmc:tiny-llama", recipe=_recipe("FP8_BLOCK"), output_dir=str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))
    k_proj = result.model.model.layers[0].self_attn.k_proj
    assert tuple(k_proj.weight_scale.shape) == (1, 2)
    assert weight_codes(k_proj).dtype == torch.float8_e4m3fn


def test_float_checkpoint_tensor_layout():
    """The tensors of one Linear ``[64, 256]`` per format, as compressed-tensors' decompressors
    read them."""
    expected = {
        "NVFP4A16": {"weight_packed": (torch.uint8, (64, 128)), "weight_scale": (torch.float8_e4m3fn, (64, 16)), "weight_global_scale": (torch.float32, (1,))},
        "MXFP4A16": {"weight_packed": (torch.uint8, (64, 128)), "weight_scale": (torch.uint8, (64, 8))},
        "MXFP6A16": {"weight_packed": (torch.uint8, (64, 192)), "weight_scale": (torch.uint8, (64, 8))},
        "MXFP8A16": {"weight": (torch.float8_e4m3fn, (64, 256)), "weight_scale": (torch.uint8, (64, 8))},
        "FP8_BLOCK": {"weight": (torch.float8_e4m3fn, (64, 256)), "weight_scale": (torch.bfloat16, (1, 2))},
    }
    for preset, tensors in expected.items():
        model = nn.Sequential(nn.Linear(256, 64, bias=False)).to(torch.bfloat16)
        quantize_linear_(model[0], PRESET_SCHEMES[preset])
        state = compressed_state_dict(model, save_compressed=True)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {f"0.{k}": v for k, v in tensors.items()}, preset


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "uint8", "symmetric": False},
            r"^type 'float' with 4 bits must be symmetric \(got symmetric false\)",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": "local"},
            r"^'dynamic' 'local' \(per-group scales at run time under a static global scale\) "
            r"needs strategy 'tensor_group' \(got 'channel'\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": "sometimes"},
            r"^'dynamic' must be true, false or 'local' \(got 'sometimes'\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128]},
            r"^'block_structure' must be a pair of positive integers \[rows, cols\], e.g. "
            r"\[128, 128\] \(got \[128\]\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 0]},
            r"^'block_structure' must be a pair of positive integers .* \(got \[128, 0\]\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.float16"},
            r"^'scale_dtype' must be one of float8_e4m3fn, uint8 or None \(got 'float16'\)$",
        ),
        (
            {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16, "scale_dtype": "uint8"},
            r"^scale_dtype uint8 \(MX power-of-two E8M0 scales\) needs strategy 'group' with "
            r"group_size 32 \(got strategy 'group', group_size 16\)$",
        ),
        (
            {"num_bits": 8, "type": "float", "strategy": "tensor_group", "group_size": 16, "scale_dtype": "float8_e4m3fn"},
            r"^FP8 scales under a global scale \(NVFP4\) need num_bits 4, strategy 'tensor_group', "
            r"group_size 16 and scale_dtype float8_e4m3fn \(got num_bits 8",
        ),
        (
            {"num_bits": 5, "type": "float", "strategy": "channel"},
            r"^'num_bits' 5 with type 'float' is not supported; type 'float' takes num_bits 4 "
            r"\(FP4 E2M1\), 6 \(FP6 E2M3\) or 8 \(FP8 E4M3\)$",
        ),
        (
            {"num_bits": 4, "strategy": "group", "group_size": 32, "zp_dtype": "torch.uint8"},
            r"^'zp_dtype' must be int8 for these arguments \(got 'uint8'\)$",
        ),
    ],
    ids=[
        "fp4-asymmetric", "local-not-tensor-group", "dynamic-value", "block-one-int", "block-zero",
        "scale-dtype", "mx-group-size", "nvfp4-bits", "float5", "zp-dtype",
    ],
)
def test_float_args_invalid_raise(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        QuantizationArgs(**kwargs)


def test_group_size_not_dividing_a_layer_names_it():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(24, 8))
    with pytest.raises(
        CalibrationError,
        match=r"^group size 16 does not divide the input width 24 of 1; choose a group size",
    ):
        plan_quantization(
            model, [preset_scheme("NVFP4A16")], modifier="QuantizationModifier",
            targets=["Linear"], ignore=[], skip_incompatible=False,
        )


def test_nvfp4_oneshot_calibrates_input_global_scales_and_loads_with_the_same_logits(tmp_path: Path):
    """The NVFP4 preset end to end: each Linear's input_global_scale from the static_minmax
    observer over the calibration tokens it receives (q/k/v, which read one input, get one),
    written to the checkpoint, and transformers computes the in-memory logits."""
    from llmc import oneshot

    recipe = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: NVFP4, ignore: [lm_head]}\n"
    result = oneshot(
        model="llmc:tiny-llama", precision="bfloat16", recipe=recipe, dataset="llmc:stdlib-docs",
        num_calibration_samples=4, max_seq_length=64, output_dir=str(tmp_path / "out"),
    )
    rows = {row["module"]: row for row in result.report["modules"]}
    attention = result.model.model.layers[0].self_attn
    scales = [getattr(attention, p).input_global_scale for p in ("q_proj", "k_proj", "v_proj")]
    assert scales[0].dtype == torch.float32 and torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])
    assert rows["model.layers.0.self_attn.q_proj"]["input_observer"] == "static_minmax"
    assert rows["model.layers.0.self_attn.q_proj"]["input_global_scale"] == pytest.approx(float(scales[0]))
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.bfloat16)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.input_global_scale, scales[0])
    ours, theirs = sample_logits(result.model, result.tokenizer), sample_logits(loaded, result.tokenizer)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP4", "MXFP6A16", "MXFP8A16", "FP8_BLOCK"])
def test_float_preset_dense_round_trip(preset, tmp_path: Path):
    """``save_compressed=False``: the float weight (and scales, NVFP4's global scale) that the
    loader fake-quantizes again on every forward, to the same logits."""
    result = oneshot(
        model="llmc:tiny-llama", precision="bfloat16", recipe=_recipe(preset),
        output_dir=str(tmp_path / "out"), save_compressed=False,
    )
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert (config["format"], config["quantization_status"]) == ("dense", "frozen")
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.bfloat16)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))


def test_config_zp_dtype_and_scale_dtype_read_as_compressed_tensors_writes_them():
    entry = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    scheme = scheme_from_config_dict({"targets": ["Linear"], "weights": entry})
    assert scheme.weights == PRESET_SCHEMES["MXFP4A16"].weights
    with pytest.raises(ArgumentError, match=r"^'weights.zp_dtype' must be float8_e4m3fn or uint8"):
        scheme_from_config_dict({"targets": ["Linear"], "weights": {**entry, "zp_dtype": "torch.int8"}})


def test_float_scheme_refuses_a_format_that_cannot_hold_it():
    with pytest.raises(
        ArgumentError,
        match=r"^format 'float-quantized' cannot hold NVFP4 weights; use one of "
        r"'nvfp4-pack-quantized' or leave format unset$",
    ):
        attrs.evolve(PRESET_SCHEMES["NVFP4A16"], format="float-quantized")
    with pytest.raises(ArgumentError, match=r"^format 'naive-quantized' cannot hold MXFP8 weights"):
        attrs.evolve(PRESET_SCHEMES["MXFP8A16"], format="naive-quantized")


def test_block_kernels_in_row_pieces_equal_one_piece(monkeypatch):
    """Large weights are processed a few rows at a time; block scales are sliced by whole row
    blocks, so the result is the same as in one piece."""
    import llmc.quantization.math as qmath

    args = PRESET_SCHEMES["FP8_BLOCK"].weights
    W = _weights(5, torch.bfloat16, rows=300, cols=384)
    scale, zero_point = compute_qparams(W, args)
    whole = fake_quantize(W, scale, zero_point, args)
    monkeypatch.setattr(qmath, "_PIECE_ELEMENTS", 384 * 7)  # 7 rows a piece: rounded up to 128
    assert torch.equal(fake_quantize(W, scale, zero_point, args), whole)
    assert torch.equal(_bits(quantize(W, scale, zero_point, args)), _bits(ct_quantize(W, scale, zero_point, _ct_args(args), dtype=torch.float8_e4m3fn)))


def test_mixed_float_formats_round_trip(tmp_path: Path):
    """NVFP4 attention and MXFP8 MLP in one checkpoint: top-level format mixed-precision, one
    format per config group, and the loaded model computes the in-memory logits."""
    recipe = _recipe({"NVFP4A16": ["re:.*self_attn.*"], "MXFP8A16": ["re:.*mlp.*"]})
    result = oneshot(model="llmc:tiny-llama", precision="bfloat16", recipe=recipe, output_dir=str(tmp_path / "out"))
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["mxfp8-quantized", "nvfp4-pack-quantized"]
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.bfloat16)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))


NVFP4_ENTRY = {  # the config group compressed-tensors writes for its NVFP4 preset
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group", "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"},
    "input_activations": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group", "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"},
}


@torch.no_grad()
def test_nvfp4_with_observed_input_global_scales_round_trip(tmp_path: Path):
    """The pieces NVFP4 needs besides calibration: with ``input_global_scale`` buffers made
    from observed input ranges (here a plain min/max over a few token sequences, standing in
    for the static observers), the checkpoint holds them and transformers computes the
    in-memory logits (NVFP4 activations run on CPU in compressed-tensors)."""
    from transformers import AutoTokenizer

    from llmc.quantization import shared_global_scales
    from llmc.save import save_checkpoint

    path = resolve_model_path("llmc:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    scheme = scheme_from_config_dict(NVFP4_ENTRY)
    plan = {n: (m, scheme) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ranges: dict[str, list[torch.Tensor]] = {}

    def observe(name):
        def hook(module, args):
            lo, hi = torch.aminmax(args[0])
            old = ranges.get(name, [lo, hi])
            ranges[name] = [torch.minimum(old[0], lo), torch.maximum(old[1], hi)]
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, (m, _) in plan.items()]
    model(torch.randint(4, 4096, (3, 24), generator=torch.Generator().manual_seed(0)))
    for handle in handles:
        handle.remove()
    global_scales = shared_global_scales(plan, list(plan))
    for name, (module, _) in plan.items():
        quantize_linear_(module, scheme, global_scale=global_scales[name])
        module.register_buffer("input_global_scale", input_global_scale_from_range(*ranges[name]))
    out = save_checkpoint(model, tokenizer, tmp_path / "out")

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.input_global_scale, model.model.layers[0].self_attn.q_proj.input_global_scale)
    ours, theirs = sample_logits(model, tokenizer), sample_logits(loaded, tokenizer)
    assert torch.equal(theirs, ours)


# The config group llm-compressor 0.14 writes for NVFP4A16 (measured on llmc:tiny-llama).
LLM_COMPRESSOR_NVFP4A16_GROUP = {
    "format": "nvfp4-pack-quantized", "input_activations": None, "output_activations": None,
    "targets": ["Linear"],
    "weights": {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": 16,
        "num_bits": 4, "observer": "memoryless_minmax", "observer_kwargs": {},
        "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
        "type": "float", "zp_dtype": None,
    },
}


def test_nvfp4a16_config_group_has_llm_compressors_keys():
    """Same keys and values as llm-compressor writes, except the observer's name (llmc writes
    "minmax"; both mean min-max for static weights)."""
    model = nn.Sequential(nn.Linear(64, 8))
    quantize_linear_(model[0], PRESET_SCHEMES["NVFP4A16"])
    group = quantization_config(model)["config_groups"]["group_0"]
    expected = copy.deepcopy(LLM_COMPRESSOR_NVFP4A16_GROUP)
    expected["weights"]["observer"] = "minmax"
    assert group == expected


def test_nvfp4_inputs_without_input_global_scale_are_not_saved():
    scheme = scheme_from_config_dict(NVFP4_ENTRY)
    model = nn.Sequential(nn.Linear(64, 8))
    quantize_linear_(model[0], scheme)
    with pytest.raises(
        SaveError,
        match=r"^0 has NVFP4 input activations \(strategy 'tensor_group'\) but no input_global_scale; "
        r"it comes from calibration data",
    ):
        compressed_state_dict(model, save_compressed=True)


@st.composite
def _float_case(draw):
    name = draw(st.sampled_from(["NVFP4A16", "MXFP4A16", "MXFP6A16", "MXFP8A16", "FP8_BLOCK"]))
    rows = draw(st.integers(1, 5))
    cols = 32 * draw(st.integers(1, 3))
    values = draw(arrays(np.float32, (rows, cols), elements=st.floats(-8, 8, width=32)))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    return torch.from_numpy(values).to(dtype), PRESET_SCHEMES[name]


@settings(max_examples=120, deadline=None)
@given(_float_case())
def test_float_quantization_is_idempotent_and_codes_are_recovered(case):
    """Re-quantizing the in-memory weight gives it back, and its codes are exactly the ones
    rounding produced (the saver recovers codes from the weight)."""
    W, scheme = case
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False).to(W.dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
    quantize_linear_(linear, scheme)
    grid_scale = effective_scale(linear.weight_scale, getattr(linear, "weight_global_scale", None))
    codes = quantize(W, grid_scale, linear.weight_zero_point, scheme.weights)
    assert torch.equal(weight_codes(linear).to(torch.float32), codes.to(torch.float32))  # -0 == +0 here
    again = fake_quantize(linear.weight, grid_scale, linear.weight_zero_point, scheme.weights)
    assert torch.equal(again, linear.weight)


def test_float32_model_with_fp4_weights_evaluates(tmp_path: Path):
    """compressed-tensors decompresses FP4/MX weights to bfloat16 whatever the model's dtype;
    llmc's loader (``llmc eval``) then loads the float32 model in bfloat16 so it runs."""
    from llmc import oneshot
    from llmc.evaluate import load_model_for_eval

    result = oneshot(model="llmc:tiny-llama", recipe="llmc:mxfp4a16", output_dir=str(tmp_path / "out"))
    model, tokenizer = load_model_for_eval(str(result.output_dir), precision="float32")
    assert model.dtype == torch.bfloat16
    batch = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
