"""FP8 (E4M3) weights, data-free, against compressed-tensors' own code at every step.

The oracles: compressed-tensors' ``calculate_qparams`` and ``quantize`` for the codes and scales
(on random weights and on the embedded model's trained ones), its quantized forward for the
in-memory module, its ``ModelCompressor`` for the checkpoint tensors and config, and transformers'
loader for the round trip. FP8 codes are compared as bytes, which also tells -0 from +0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from compressed_tensors.quantization.utils import calculate_qparams
from torch import nn
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.models import resolve_model_path
from llmc.quantization import (
    FP8_E4M3,
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    compute_qparams,
    dynamic_activation_fake_quantize,
    quantize,
    quantize_linear_,
    quantized_linears,
    weight_codes,
)
from llmc.save import compressed_state_dict, quantization_config
from llmc.testing import build_causal_lm, sample_logits

FP8_DYNAMIC = PRESET_SCHEMES["FP8_DYNAMIC"]
FP8_TENSOR_WEIGHT_ONLY = QuantizationScheme(
    weights=QuantizationArgs(num_bits=8, type="float", strategy="tensor")
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_E4M3 else t


def _ct_scheme(scheme: QuantizationScheme):
    from compressed_tensors.quantization import QuantizationScheme as CTScheme

    return CTScheme.model_validate(scheme.to_config_dict())


def _ct_minmax(W: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max observation llm-compressor makes before calling calculate_qparams."""
    if strategy == "tensor":
        return W.amin(), W.amax()
    return W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True)


def _with_signed_zeros_(W: torch.Tensor) -> torch.Tensor:
    """Weights whose codes include -0 (tiny negatives) and +0 (exact -0.0 and 0.0)."""
    W[0, :8] = -1e-7  # representable in fp16 too, and below half the smallest FP8 step
    W[1, :8] = -0.0
    W[2, :] = 0.0  # an all-zero row: the scale is eps
    return W


def _assert_codes_equal_reference(W: torch.Tensor, scheme: QuantizationScheme) -> int:
    args = scheme.weights
    ct_args = _ct_scheme(scheme).weights
    scale, zero_point = compute_qparams(W, args)
    ct_scale, ct_zero_point = calculate_qparams(*_ct_minmax(W, args.strategy), ct_args)
    assert scale.dtype == W.dtype and zero_point.dtype == FP8_E4M3 == ct_zero_point.dtype
    assert torch.equal(scale, ct_scale)
    assert torch.equal(_bits(zero_point), _bits(ct_zero_point))
    codes = quantize(W, scale, zero_point, args)
    ct_codes = ct_quantize(W, ct_scale, ct_zero_point, ct_args, dtype=FP8_E4M3)
    assert codes.dtype == FP8_E4M3
    differing = int((_bits(codes) != _bits(ct_codes)).sum())
    assert differing == 0
    return int((_bits(codes) == 0x80).sum())  # how many -0 codes the case exercised


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fp8_codes_and_scales_equal_compressed_tensors_on_random_weights(dtype, strategy):
    scheme = QuantizationScheme(
        weights=QuantizationArgs(num_bits=8, type="float", strategy=strategy)
    )
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    W[3, 7] = 6.0  # an outlier
    W = _with_signed_zeros_(W.to(dtype))
    assert _assert_codes_equal_reference(W, scheme) >= 8


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fp8_codes_and_scales_equal_compressed_tensors_on_trained_weights(dtype):
    """Every Linear of the embedded tiny Llama (trained weights), per channel and per tensor."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) > 7
    for _, module in linears:
        W = module.weight.detach().to(dtype)
        _assert_codes_equal_reference(W, FP8_DYNAMIC)
        _assert_codes_equal_reference(W, FP8_TENSOR_WEIGHT_ONLY)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fp8_quantized_linear_computes_compressed_tensors_forward(dtype):
    """The in-memory module (fake-quantized weight + per-token FP8 input pre-hook) computes
    exactly compressed-tensors' quantized forward of the same Linear."""
    torch.manual_seed(0)
    ours = nn.Linear(128, 48, bias=True).to(dtype)
    with torch.no_grad():
        _with_signed_zeros_(ours.weight)
    theirs = copy.deepcopy(ours)
    quantize_linear_(ours, FP8_DYNAMIC)

    ct_scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    initialize_module_for_quantization(theirs, ct_scheme)
    W = theirs.weight.detach()
    scale, zero_point = calculate_qparams(*_ct_minmax(W, "channel"), ct_scheme.weights)
    theirs.weight_scale.data, theirs.weight_zero_point.data = scale, zero_point
    theirs.quantization_status = QuantizationStatus.FROZEN

    x = (torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[0, 0] = 0.0  # an all-zero token: its scale is eps
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
        without_inputs = nn.functional.linear(x, ours.weight, ours.bias)
    assert torch.equal(got, expected)
    assert not torch.equal(got, without_inputs)  # the input really is FP8-quantized per token
    assert torch.equal(ours.weight_scale, scale)
    assert ours.weight_zero_point.dtype == FP8_E4M3
    x_hat = dynamic_activation_fake_quantize(x, FP8_DYNAMIC.input_activations)
    assert torch.equal(got, nn.functional.linear(x_hat, ours.weight, ours.bias))


def _compressor_checkpoint(model: nn.Module, preset: str):
    """What compressed-tensors writes for ``model`` quantized with ``preset`` and min-max scales
    (llm-compressor's data-free path): state dict and quantization config."""
    scheme = preset_name_to_scheme(preset, ["Linear"]) if isinstance(preset, str) else preset
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            W = module.weight.detach()
            scale, zero_point = calculate_qparams(
                *_ct_minmax(W, scheme.weights.strategy), module.quantization_scheme.weights
            )
            module.weight_scale.data, module.weight_zero_point.data = scale, zero_point
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return model.state_dict(), compressor.quantization_config.model_dump(mode="json")


CHECKPOINT_CASES = {
    "fp8-dynamic": (FP8_DYNAMIC, "FP8_DYNAMIC"),
    "fp8-tensor-weight-only": (FP8_TENSOR_WEIGHT_ONLY, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_fp8_checkpoint_equals_compressed_tensors_compressor(case, dtype):
    """Our writer's tensors are byte for byte compressed-tensors' ModelCompressor output for the
    same model (names, dtypes, shapes, bytes), and the config says the same."""
    scheme, preset = CHECKPOINT_CASES[case]
    base = build_causal_lm("llama", hidden=64).to(dtype)
    with torch.no_grad():
        _with_signed_zeros_(base.model.layers[0].self_attn.q_proj.weight)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantize_linear_(module, scheme)
    state = compressed_state_dict(ours, save_compressed=True)
    config = quantization_config(ours)
    ct_state, ct_config = _compressor_checkpoint(theirs, preset or _ct_scheme(scheme))

    assert set(state) == set(ct_state)
    for key, tensor in state.items():
        expected = ct_state[key]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), key
        assert torch.equal(_bits(tensor), _bits(expected)), key
    q_proj = "model.layers.0.self_attn.q_proj"
    assert state[f"{q_proj}.weight"].dtype == FP8_E4M3
    assert state[f"{q_proj}.weight_scale"].dtype == dtype
    rows = base.model.layers[0].self_attn.q_proj.out_features
    assert tuple(state[f"{q_proj}.weight_scale"].shape) == ((rows, 1) if preset else (1,))
    assert int((_bits(state[f"{q_proj}.weight"]) == 0x80).sum()) >= 8  # -0 codes kept

    for key in ("format", "ignore", "quant_method", "quantization_status", "kv_cache_scheme"):
        assert config[key] == ct_config[key], key
    ours_group = _ct_scheme(scheme).model_dump(mode="json")
    ours_group.update(format=config["config_groups"]["group_0"]["format"])
    # compressed-tensors' presets leave the weight observer unset (min-max for static weights);
    # llm-compressor and llmc write "minmax"
    assert ours_group["weights"].pop("observer") == "minmax"
    ct_group = ct_config["config_groups"]["group_0"]
    assert ct_group["weights"].pop("observer", None) == (None if preset else "minmax")
    assert ct_group == ours_group


def test_fp8_dynamic_oneshot_round_trip_through_transformers(tmp_path: Path):
    """``llmc:fp8_dynamic`` on the embedded model: transformers + compressed-tensors load the
    checkpoint on CPU (they dequantize FP8 to the model dtype on load) and compute the in-memory
    model's logits exactly."""
    result = oneshot(
        model="llmc:tiny-llama", recipe="llmc:fp8_dynamic", output_dir=str(tmp_path / "out")
    )
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["type"] == group["input_activations"]["type"] == "float"
    assert config["ignore"] == ["lm_head"]

    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    ours = sample_logits(result.model, result.tokenizer)
    theirs = sample_logits(loaded, result.tokenizer)
    assert torch.equal(theirs, ours)
    quantized = dict(quantized_linears(result.model))
    assert len(quantized) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    for name, module in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, module.weight), name
        assert weight_codes(module).dtype == FP8_E4M3
    original = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    original = sample_logits(original, result.tokenizer)
    assert (original - ours).abs().max() > 1e-3  # the model really was quantized
    rows = {row["module"]: row for row in result.report["modules"]}
    assert rows["model.layers.0.mlp.down_proj"]["scheme"] == "w:fp8 channel sym, a:fp8 token"
