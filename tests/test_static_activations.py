"""Static activation scales (observers, ``input_scale``) and KV-cache scales (``k_scale``/``v_scale``).

The oracles: compressed-tensors' ``calculate_qparams``, ``fake_quantize`` and ``forward_quantize``
for the observers' arithmetic (with llm-compressor 0.14's algorithms written out here: moving
average with constant 0.01, the shrink-factor MSE search), transformers' loader for the round
trip, and plain forward hooks on the unquantized model for what calibration should have seen.

compressed-tensors 0.20.1 recognises a cached attention module by a ``past_key_values``
parameter that transformers 5.24 renamed ``cache``, so its loader ignores ``k_scale``/``v_scale``
(they load as unexpected keys) and does not quantize the KV cache; vLLM reads them. The KV tests
therefore check the saved scales against the states they were observed on and re-apply them to
the loaded model with llmc's tap, whose rounding is checked against ``forward_quantize``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationArgs as CTArgs
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization import QuantizationScheme as CTScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from llmc import oneshot
from llmc.args import DatasetArguments
from llmc.data import load_calibration_data
from llmc.errors import ArgumentError
from llmc.models import resolve_model_path
from llmc.modifiers.quantization import QuantizationModifier
from llmc.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    compute_qparams,
    fake_quantize,
    quantize_linear_,
    scheme_from_config_dict,
    set_input_qparams_,
)
from llmc.quantization.kv_cache import cached_attention_modules, set_kv_scales_, tap_kv_cache_
from llmc.quantization.math import static_activation_fake_quantize
from llmc.quantization.observers import make_observer, observe_weight
from llmc.save import compressed_state_dict, quantization_config
from llmc.testing import build_causal_lm, sample_logits

SAMPLES = {"dataset": "llmc:stdlib-docs", "num_calibration_samples": 8, "max_seq_length": 64}
FP8_MAX = 448.0
KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _recipe(body: str) -> str:
    return "quant_stage:\n  quant_modifiers:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())


def _ct_args(args: QuantizationArgs) -> CTArgs:
    return CTArgs.model_validate(args.to_config_dict())


def _batches(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(2, 16, 96) * (1 + i) + i for i in range(4)]


# --- observers against compressed-tensors' arithmetic ---------------------------------------


def _ct_scale(lo: torch.Tensor, hi: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return calculate_qparams(lo, hi, _ct_args(args))


def _observed_scale(name: str, args_kwargs: dict, batches: list[torch.Tensor], **observer_kwargs):
    args = QuantizationArgs(**args_kwargs, observer=name, observer_kwargs=observer_kwargs)
    observer = make_observer(args, "input")
    for x in batches:
        observer.update(x.reshape(-1, x.shape[-1]))
    return args, observer.finalize()


ARG_CASES = {
    "fp8": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    "int8-asym": {"num_bits": 8, "strategy": "tensor", "symmetric": False},
}


@pytest.mark.parametrize("case", ARG_CASES)
def test_static_minmax_is_the_range_of_every_token(case):
    batches = _batches()
    args, (scale, zero_point) = _observed_scale("static_minmax", ARG_CASES[case], batches)
    everything = torch.cat([x.reshape(-1) for x in batches])
    ct_scale, ct_zero_point = _ct_scale(everything.min().reshape(1), everything.max().reshape(1), args)
    assert torch.equal(scale, ct_scale)
    assert torch.equal(zero_point.float(), ct_zero_point.float())


@pytest.mark.parametrize("constant", [0.01, 0.3, 1.0], ids=["default", "0.3", "memoryless"])
@pytest.mark.parametrize("case", ARG_CASES)
def test_minmax_is_a_moving_average_of_batch_ranges(case, constant):
    """llm-compressor's ``minmax``: the first batch sets the range, each later one moves it by
    ``averaging_constant``; 1.0 keeps only the last batch."""
    batches = _batches()
    kwargs = {} if constant == 0.01 else {"averaging_constant": constant}
    args, (scale, zero_point) = _observed_scale("minmax", ARG_CASES[case], batches, **kwargs)
    lo, hi = batches[0].min(), batches[0].max()
    for x in batches[1:]:
        if constant != 1.0:
            lo, hi = lo * (1 - constant) + x.min() * constant, hi * (1 - constant) + x.max() * constant
        else:
            lo, hi = x.min(), x.max()
    ct_scale, ct_zero_point = _ct_scale(lo.reshape(1), hi.reshape(1), args)
    assert torch.equal(scale, ct_scale)
    assert torch.equal(zero_point.float(), ct_zero_point.float())
    if constant == 0.01:  # barely moved from the first batch, unlike the global range
        _, (static, _) = _observed_scale("static_minmax", ARG_CASES[case], batches)
        assert scale < static


def _reference_mse_range(observed: torch.Tensor, args: QuantizationArgs, grid=100.0, maxshrink=0.2, patience=5, norm=2.4):
    """llm-compressor 0.14's search, on compressed-tensors' qparams and fake quantization."""
    ct_args = _ct_args(args)
    token_args = ct_args.model_copy(update={"strategy": "token"})  # element-wise, as llm-compressor
    lo, hi = torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))
    best = torch.full_like(lo, torch.finfo(lo.dtype).max)
    best_lo, best_hi, stale = lo.clone(), hi.clone(), 0
    for step in range(int(maxshrink * grid)):
        p = 1 - step / grid
        scale, zero_point = calculate_qparams(lo * p, hi * p, ct_args)
        q = ct_fake_quantize(observed, scale.unsqueeze(-1), zero_point.unsqueeze(-1), token_args)
        error = (q - observed).abs().pow(norm).sum(dim=(0, -1))
        better = error < best
        if better.any():
            best[better], best_lo[better], best_hi[better], stale = error[better], (lo * p)[better], (hi * p)[better], 0
        else:
            stale += 1
            if stale >= patience:
                break
    return calculate_qparams(best_lo, best_hi, ct_args)


@pytest.mark.parametrize(
    "weights",
    [
        {"num_bits": 4, "strategy": "group", "group_size": 32},
        {"num_bits": 4, "strategy": "channel", "symmetric": False},
        {"num_bits": 8, "type": "float", "strategy": "channel"},
    ],
    ids=["int4-group", "int4-asym-channel", "fp8-channel"],
)
def test_mse_weight_observer_equals_reference_search_and_beats_minmax(weights):
    torch.manual_seed(0)
    W = torch.randn(48, 128) * torch.rand(48, 1)
    args = QuantizationArgs(**weights, observer="mse")
    scale, zero_point = observe_weight(W, args)
    observed = W.unsqueeze(-2).unsqueeze(0) if args.strategy == "channel" else W.unflatten(-1, (-1, 32)).unsqueeze(0)
    ct_scale, ct_zero_point = _reference_mse_range(observed, args)
    assert torch.equal(scale, ct_scale)
    assert torch.equal(zero_point.float(), ct_zero_point.float())
    minmax_scale, minmax_zero_point = compute_qparams(W, args)
    mse_error = (fake_quantize(W, scale, zero_point, args) - W).pow(2).sum()
    minmax_error = (fake_quantize(W, minmax_scale, minmax_zero_point, args) - W).pow(2).sum()
    assert mse_error <= minmax_error


def test_mse_weight_error_is_lower_than_minmax_on_a_trained_weight():
    weights = load_file(Path(resolve_model_path("llmc:tiny-llama")) / "model.safetensors")
    W = weights["model.layers.0.mlp.down_proj.weight"].float()
    for group_size in (32, 128):
        args = QuantizationArgs(num_bits=4, strategy="group", group_size=group_size, observer="mse")
        mse = fake_quantize(W, *observe_weight(W, args), args)
        minmax = fake_quantize(W, *compute_qparams(W, args), args)
        assert (mse - W).pow(2).sum() < (minmax - W).pow(2).sum()


def test_mse_input_observer_moves_its_range_like_minmax():
    batches = _batches()
    args, (scale, _) = _observed_scale("mse", ARG_CASES["fp8"], batches, averaging_constant=1.0)
    last = batches[-1].reshape(-1, 1, 96)
    ct_scale, _ = _reference_mse_range(last, args)
    assert torch.equal(scale, ct_scale)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_kv_observer_scale_per_tensor_or_head(strategy):
    torch.manual_seed(0)
    states = [torch.randn(2, 4, 16, 32) * torch.arange(1, 5).reshape(1, 4, 1, 1) for _ in range(2)]
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, observer="static_minmax")
    observer = make_observer(args, "kv")
    for k in states:
        observer.update(k)
    scale, _ = observer.finalize()
    absmax = torch.stack(states).abs().amax(dim=(0, 1, 3, 4))  # [heads]
    expected = absmax.max().reshape(1) if strategy == "tensor" else absmax.reshape(4, 1, 1)
    assert torch.equal(scale, expected / FP8_MAX)


# --- arguments and recipes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: QuantizationArgs(num_bits=8, strategy="token"), r"^strategy 'token' needs dynamic true"),
        (
            lambda: QuantizationArgs(num_bits=8, strategy="tensor", observer="minmx"),
            r"^unknown observer 'minmx'; did you mean 'minmax'\?$",
        ),
        (
            lambda: QuantizationArgs(num_bits=8, strategy="tensor", observer="mse", observer_kwargs={"grd": 50}),
            r"^observer 'mse' has no observer_kwargs 'grd'; it takes maxshrink, patience, grid, norm, averaging_constant$",
        ),
        (
            lambda: QuantizationScheme(
                weights=QuantizationArgs(num_bits=8, type="float", strategy="tensor"),
                input_activations=QuantizationArgs(num_bits=8, type="float", strategy="channel"),
            ),
            r"^static 'input_activations' \(dynamic false\) support strategy 'tensor' \(got 'channel'\)",
        ),
        (
            lambda: QuantizationModifier(scheme="FP8", kv_cache_scheme={**KV_SCHEME, "dynamic": True}),
            r"^'kv_cache_scheme' must be static \(dynamic false\), symmetric, with strategy 'tensor' or "
            r"'attn_head' \(got dynamic True",
        ),
    ],
    ids=["static-token", "unknown-observer", "unknown-observer-kwarg", "static-channel-inputs", "dynamic-kv"],
)
def test_bad_static_arguments_raise_one_line(make, message):
    with pytest.raises(ArgumentError, match=message):
        make()


def test_only_static_scales_need_calibration_data():
    assert not QuantizationModifier(scheme="W4A16").requires_calibration_data
    assert not QuantizationModifier(scheme="FP8_DYNAMIC").requires_calibration_data
    assert QuantizationModifier(scheme="FP8").requires_calibration_data
    assert QuantizationModifier(scheme="W4A16", kv_cache_scheme=KV_SCHEME).requires_calibration_data


def test_static_inputs_without_a_dataset_ask_for_one(tmp_path):
    with pytest.raises(
        ArgumentError,
        match=r"^QuantizationModifier needs calibration data \(static activation scales \(static "
        r"input_activations or kv_cache_scheme\) are observed on it\) but no dataset was given; "
        r"pass dataset=\.\.\. \(for example 'llmc:stdlib-docs'\)$",
    ):
        oneshot(model="llmc:tiny-llama", recipe=_recipe("QuantizationModifier:\n  scheme: FP8"), output_dir=str(tmp_path / "o"))


# --- FP8 static end to end -----------------------------------------------------------------


def _calibration_inputs(model: nn.Module, tokenizer, names: list[str]) -> dict[str, float]:
    """max |x| over the calibration tokens of each named Linear's input, from plain hooks."""
    samples = load_calibration_data(DatasetArguments(**SAMPLES), tokenizer)
    absmax = dict.fromkeys(names, 0.0)
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: absmax.__setitem__(name, max(absmax[name], float(args[0].abs().max()))),
            prepend=True,  # before a quantized module's own input quantizer
        )
        for name in names
    ]
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample.reshape(1, -1), use_cache=False)
    for handle in handles:
        handle.remove()
    return absmax


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "out"
    return oneshot(model="llmc:tiny-llama", recipe="llmc:fp8", output_dir=str(out), **SAMPLES)


def test_fp8_static_round_trip_through_transformers(fp8_run):
    """transformers + compressed-tensors load the checkpoint on CPU and compute our in-memory
    logits exactly: the same FP8 weights and the same static FP8 input quantization."""
    config = json.loads((fp8_run.output_dir / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == group["format"] == "float-quantized"
    assert group["input_activations"]["dynamic"] is False
    assert group["input_activations"]["observer"] == "static_minmax"
    assert config["kv_cache_scheme"] is None
    state = load_file(fp8_run.output_dir / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj"
    assert state[f"{q_proj}.input_scale"].dtype == torch.float32
    assert tuple(state[f"{q_proj}.input_scale"].shape) == tuple(state[f"{q_proj}.weight_scale"].shape) == (1,)
    assert not [key for key in state if key.endswith("input_zero_point")]  # symmetric: none, as compressed-tensors
    loaded = AutoModelForCausalLM.from_pretrained(fp8_run.output_dir)
    ours = sample_logits(fp8_run.model, fp8_run.tokenizer)
    assert torch.equal(sample_logits(loaded, fp8_run.tokenizer), ours)
    for name, module in fp8_run.model.named_modules():
        if hasattr(module, "input_scale"):
            assert torch.equal(loaded.get_submodule(name).input_scale, module.input_scale), name
    without_inputs = fp8_run.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 5, without_inputs.in_features) * 0.3
    assert not torch.equal(without_inputs(x), nn.functional.linear(x, without_inputs.weight))  # inputs really quantized


def test_fp8_input_scale_is_absmax_over_calibration_inputs(fp8_run):
    """Layer 0 sees the unquantized model's activations, so every input scale there is max|x|/448
    over what plain hooks on the original model see; later layers' q/k/v read the hidden states
    the compressed layers before them produce, which the quantized model itself reproduces."""
    original = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    layer0 = [name for name, _ in fp8_run.model.model.layers[0].named_modules(prefix="model.layers.0") if name.endswith("proj")]
    first = _calibration_inputs(original, fp8_run.tokenizer, layer0)
    assert len(first) == 7
    for name in layer0:
        scale = fp8_run.model.get_submodule(name).input_scale
        assert torch.equal(scale, torch.tensor([first[name]]) / FP8_MAX), name
    later = [f"model.layers.{i}.self_attn.{p}" for i in (1, 2, 3) for p in ("q_proj", "v_proj")]
    absmax = _calibration_inputs(fp8_run.model, fp8_run.tokenizer, later)
    for name in later:
        scale = float(fp8_run.model.get_submodule(name).input_scale)
        assert scale == pytest.approx(absmax[name] / FP8_MAX, rel=1e-5), name
    rows = {row["module"]: row for row in fp8_run.report["modules"]}
    row = rows["model.layers.0.mlp.down_proj"]
    assert row["input_scale"] == pytest.approx(first["model.layers.0.mlp.down_proj"] / FP8_MAX)
    tokens = sum(len(sample) for sample in load_calibration_data(DatasetArguments(**SAMPLES), fp8_run.tokenizer))
    assert row["input_observer"] == "static_minmax" and row["input_tokens"] == tokens
    assert row["scheme"] == "w:fp8 tensor sym, a:fp8 tensor static"


def test_int8_static_asymmetric_inputs_round_trip(tmp_path):
    recipe = _recipe(
        """
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    group_0:
      targets: [Linear]
      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
      input_activations: {num_bits: 8, type: int, symmetric: false, strategy: tensor, dynamic: false, observer: minmax}
"""
    )
    result = oneshot(model="llmc:tiny-llama", recipe=recipe, output_dir=str(tmp_path / "out"), **SAMPLES)
    state = load_file(result.output_dir / "model.safetensors")
    zero_point = state["model.layers.0.mlp.down_proj.input_zero_point"]
    assert (zero_point.dtype, tuple(zero_point.shape)) == (torch.int8, (1,))
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))


@pytest.mark.parametrize("case", ["fp8", "int8-asym"])
def test_static_input_checkpoint_equals_compressed_tensors_compressor(case):
    """Given the same scales, our writer's tensors are byte for byte those of compressed-tensors'
    ModelCompressor (names, dtypes, shapes), and the config groups say the same."""
    inputs = {"fp8": {"type": "float"}, "int8-asym": {"symmetric": False}}[case]
    weights = {"fp8": {"type": "float", "strategy": "tensor"}, "int8-asym": {"strategy": "channel"}}[case]
    entry = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, **weights},
        "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False, "observer": "static_minmax", **inputs},
    }
    scheme = scheme_from_config_dict(entry)
    base = build_causal_lm("llama", hidden=64)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)
    ranges = {}
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantize_linear_(module, scheme)
            lo, hi = -torch.rand(1) - 0.5, torch.rand(1) * 3
            ranges[name] = (lo, hi)
            observer = make_observer(scheme.input_activations, "input", module.weight.dtype)
            observer.update(torch.cat([lo, hi]).reshape(1, 2))
            set_input_qparams_(module, scheme, *observer.finalize())
    apply_quantization_config(
        theirs, QuantizationConfig(config_groups={"group_0": CTScheme.model_validate(scheme.to_config_dict())}, ignore=["lm_head"])
    )
    for name, module in theirs.named_modules():
        if name in ranges:
            W = module.weight.detach()
            lo_w, hi_w = (W.amin(), W.amax()) if scheme.weights.strategy == "tensor" else (W.amin(1, keepdim=True), W.amax(1, keepdim=True))
            module.weight_scale.data, module.weight_zero_point.data = calculate_qparams(lo_w, hi_w, module.quantization_scheme.weights)
            module.input_scale.data, module.input_zero_point.data = calculate_qparams(*ranges[name], module.quantization_scheme.input_activations)
    compressor = ModelCompressor.from_pretrained_model(theirs)
    compressor.compress_model(theirs)
    state, ct_state = compressed_state_dict(ours, save_compressed=True), theirs.state_dict()
    assert set(state) == set(ct_state)
    for key, tensor in state.items():
        expected = ct_state[key]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), key
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor,
                           expected.view(torch.uint8) if expected.dtype == torch.float8_e4m3fn else expected), key
    config = quantization_config(ours)
    ct_config = compressor.quantization_config.model_dump(mode="json")
    assert config["format"] == ct_config["format"]
    ours_group = CTScheme.model_validate(config["config_groups"]["group_0"]).model_dump(mode="json")
    assert ours_group == ct_config["config_groups"]["group_0"]


VARIANTS = {
    "int4-weights-static-fp8-inputs": (
        {"config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 128},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "observer": "static_minmax"},
        }}},
        {},
        "int-quantized",
    ),
    "fp8-mse-observers": (
        {"config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "observer": "mse"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "observer": "mse"},
        }}},
        {},
        "float-quantized",
    ),
    "fp8-dense": ({"scheme": "FP8"}, {"save_compressed": False}, "dense"),
}


@pytest.mark.parametrize("case", VARIANTS)
def test_static_input_variants_round_trip(case, tmp_path):
    modifier_args, run_args, fmt = VARIANTS[case]
    modifier = QuantizationModifier(**modifier_args, ignore=["lm_head"])
    result = oneshot(model="llmc:tiny-llama", recipe=modifier, output_dir=str(tmp_path / "out"), **SAMPLES, **run_args)
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))


# --- KV cache ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "out"
    kv = {**KV_SCHEME, "observer": "static_minmax"}
    recipe = _recipe(f"QuantizationModifier:\n  scheme: FP8\n  ignore: [lm_head]\n  kv_cache_scheme: {json.dumps(kv)}")
    return oneshot(model="llmc:tiny-llama", recipe=recipe, output_dir=str(out), **SAMPLES)


def test_kv_scales_saved_finite_and_in_the_config(kv_run):
    config = json.loads((kv_run.output_dir / "config.json").read_text())["quantization_config"]
    kv = CTArgs.model_validate(config["kv_cache_scheme"])
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == (8, "float", "tensor", False, True)
    state = load_file(kv_run.output_dir / "model.safetensors")
    for layer in range(4):
        for name in ("k_scale", "v_scale"):
            scale = state[f"model.layers.{layer}.self_attn.{name}"]
            assert (scale.dtype, tuple(scale.shape)) == (torch.float32, (1,))
            assert bool(torch.isfinite(scale).all()) and float(scale) > 0
    assert not [key for key in state if key.endswith(("k_zero_point", "v_zero_point"))]
    rows = [row for row in kv_run.report["modules"] if row["module"] == "model.layers.0.self_attn"]
    assert rows[0]["k_scale"] == pytest.approx(float(state["model.layers.0.self_attn.k_scale"]))


def test_kv_scale_is_absmax_of_post_rope_states(kv_run):
    """Layer 0's keys and values are the unquantized model's; a real cache holds them post-RoPE."""
    original = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    samples = load_calibration_data(DatasetArguments(**SAMPLES), kv_run.tokenizer)
    k_max = v_max = 0.0
    with torch.no_grad():
        for sample in samples:
            cache = DynamicCache(config=original.config)
            original(input_ids=sample.reshape(1, -1), cache=cache, use_cache=True)
            k_max = max(k_max, float(cache.layers[0].keys.abs().max()))
            v_max = max(v_max, float(cache.layers[0].values.abs().max()))
    attention = kv_run.model.model.layers[0].self_attn
    assert torch.equal(attention.k_scale, torch.tensor([k_max]) / FP8_MAX)
    assert torch.equal(attention.v_scale, torch.tensor([v_max]) / FP8_MAX)


def test_kv_quantization_is_used_and_matches_compressed_tensors(kv_run):
    """The in-memory model fake-quantizes K/V with the saved scales: the loaded checkpoint with
    those scales put back computes its logits exactly, and without them it differs; the rounding
    is compressed-tensors' ``forward_quantize`` of a ``k_scale``."""
    loaded = AutoModelForCausalLM.from_pretrained(kv_run.output_dir)
    ours = sample_logits(kv_run.model, kv_run.tokenizer)
    assert not torch.equal(sample_logits(loaded, kv_run.tokenizer), ours)
    state = load_file(kv_run.output_dir / "model.safetensors")
    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", observer="static_minmax")
    for name, attention in cached_attention_modules(loaded):
        tap_kv_cache_(attention, args)
        set_kv_scales_(attention, state[f"{name}.k_scale"], state[f"{name}.v_scale"])
    assert torch.equal(sample_logits(loaded, kv_run.tokenizer), ours)

    holder = nn.Module()
    holder.k_scale = kv_run.model.model.layers[0].self_attn.k_scale
    holder.quantization_status = QuantizationStatus.FROZEN
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 7, 32) * 3
    expected = forward_quantize(holder, keys, "k", _ct_args(args))
    assert torch.equal(static_activation_fake_quantize(keys, holder.k_scale, None, args), expected)


@pytest.mark.xfail(
    strict=True,
    reason="compressed-tensors 0.20.1 finds cached attention by a 'past_key_values' parameter that "
    "transformers 5.24 renamed 'cache', so transformers loads k_scale/v_scale as unexpected keys "
    "and does not quantize the KV cache (vLLM reads them); when this passes, the upstream gap "
    "is closed",
)
def test_kv_checkpoint_loads_in_transformers_with_the_in_memory_logits(kv_run):
    loaded = AutoModelForCausalLM.from_pretrained(kv_run.output_dir)
    ours = sample_logits(kv_run.model, kv_run.tokenizer)
    torch.testing.assert_close(sample_logits(loaded, kv_run.tokenizer), ours, rtol=1e-5, atol=1e-5)
