"""GPTQ with static input scales (FP8, int8) and KV-cache scales.

The input scales are observed in the calibration pass GPTQ shares, on the inputs each layer
receives from the already-quantized layers before it; layer 0 receives the original model's
activations, so plain hooks on the unquantized model are the oracle there. transformers'
loader is the oracle for the round trip.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.args import DatasetArguments
from llmc.data import load_calibration_data
from llmc.models import resolve_model_path
from llmc.testing import sample_logits

SAMPLES = {"dataset": "llmc:stdlib-docs", "num_calibration_samples": 8, "max_seq_length": 64}


def _recipe(body: str) -> str:
    return "quant_stage:\n  quant_modifiers:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())


def _layer0_absmax(tokenizer) -> dict[str, float]:
    original = AutoModelForCausalLM.from_pretrained(resolve_model_path("llmc:tiny-llama"))
    names = [n for n, _ in original.model.layers[0].named_modules(prefix="model.layers.0") if n.endswith("proj")]
    absmax = dict.fromkeys(names, 0.0)
    for name in names:
        original.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: absmax.__setitem__(name, max(absmax[name], float(args[0].abs().max())))
        )
    with torch.no_grad():
        for sample in load_calibration_data(DatasetArguments(**SAMPLES), tokenizer):
            original(input_ids=sample.reshape(1, -1), use_cache=False)
    return absmax


def test_gptq_fp8_static_round_trip_and_input_scales(tmp_path):
    recipe = _recipe("GPTQModifier:\n  scheme: FP8\n  ignore: [lm_head]")
    result = oneshot(model="llmc:tiny-llama", recipe=recipe, output_dir=str(tmp_path / "out"), **SAMPLES)
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert (config["format"], group["weights"]["type"], group["input_activations"]["dynamic"]) == ("float-quantized", "float", False)
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))
    for name, absmax in _layer0_absmax(result.tokenizer).items():
        assert torch.equal(result.model.get_submodule(name).input_scale, torch.tensor([absmax]) / 448.0), name
    rows = {row["module"]: row for row in result.report["modules"]}
    row = rows["model.layers.2.mlp.down_proj"]
    assert row["modifier"] == "GPTQModifier" and row["input_observer"] == "static_minmax"
    assert row["output_error"] is not None and row["input_scale"] > 0


def test_gptq_int8_static_inputs_with_kv_cache_per_head(tmp_path):
    recipe = _recipe(
        """
GPTQModifier:
  ignore: [lm_head]
  config_groups:
    group_0:
      targets: [Linear]
      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
      input_activations: {num_bits: 8, type: int, symmetric: true, strategy: tensor, dynamic: false, observer: static_minmax}
  kv_cache_scheme: {num_bits: 8, type: float, strategy: attn_head, dynamic: false, symmetric: true}
"""
    )
    result = oneshot(model="llmc:tiny-llama", recipe=recipe, output_dir=str(tmp_path / "out"), **SAMPLES)
    state = load_file(result.output_dir / "model.safetensors")
    assert state["model.layers.1.self_attn.o_proj.input_scale"].shape == (1,)
    k_scale = state["model.layers.1.self_attn.k_scale"]
    assert (k_scale.dtype, tuple(k_scale.shape)) == (torch.float32, (2, 1, 1))  # 2 KV heads
    assert bool(torch.isfinite(k_scale).all())
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["strategy"] == "attn_head"
    assert config["kv_cache_scheme"]["observer"] == "minmax"
    absmax = _layer0_absmax(result.tokenizer)
    scale = result.model.model.layers[0].mlp.gate_proj.input_scale
    assert torch.equal(scale, torch.tensor([absmax["model.layers.0.mlp.gate_proj"]]) / 127.5)
