"""Recipes: llm-compressor's layouts load and run, bad input fails in one line, checkpoints load."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from llmc import oneshot
from llmc.errors import ArgumentError, CalibrationError, RecipeError
from llmc.plugins import load_registry
from llmc.recipe import load_recipe
from llmc.testing import sample_logits
from llmc_awq import AWQModifier, SmoothQuantModifier

pytest.importorskip("compressed_tensors")

# llm-compressor 0.14's layout: AWQ first, the quantizer with the scheme after it, one stage
PEER_LAYOUT = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      duo_scaling: true
      n_grid: 6
      mappings:
        - smooth_layer: "re:.*input_layernorm"
          balance_layers: ["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"]
        - smooth_layer: "re:.*post_attention_layernorm"
          balance_layers: ["re:.*gate_proj", "re:.*up_proj"]
        - smooth_layer: "re:.*up_proj"
          balance_layers: ["re:.*down_proj"]
    QuantizationModifier:
      ignore: [lm_head]
      targets: [Linear]
      scheme: W4A16_ASYM
"""


def test_llm_compressor_layout_runs_and_the_checkpoint_loads_with_the_same_logits(
    model_dir, text_file, tokenizer, tmp_path
):
    result = oneshot(
        model=str(model_dir), recipe=PEER_LAYOUT, dataset=str(text_file), num_calibration_samples=4,
        output_dir=str(tmp_path / "out"),
    )
    smoothed = [r for r in result.report["modules"] if r["modifier"] == "AWQModifier"]
    quantized = [r for r in result.report["modules"] if r["modifier"] == "QuantizationModifier"]
    assert len(smoothed) == 3 * 2 and len(quantized) == 7 * 2  # 3 mappings, 7 Linears per layer
    assert all(r["output_error"] <= r["rtn_output_error"] for r in smoothed)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    saved = load_recipe((tmp_path / "out" / "recipe.yaml").read_text(), load_registry())
    assert [e.modifier for e in saved.modifiers] == [e.modifier for e in result.recipe.modifiers]
    # transformers 5.23 + compressed-tensors 0.20 read asymmetric pack-quantized checkpoints only
    # with dequantize=True (core's round-trip test says the same): the same decompressor
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
    )
    expected = sample_logits(result.model, tokenizer)
    assert torch.allclose(sample_logits(loaded, tokenizer), expected, atol=1e-4 * float(expected.abs().max()))


def test_awq_with_its_own_scheme_quantizes_by_itself(model_dir, text_file, tmp_path):
    recipe = "quant_stage:\n  quant_modifiers:\n    AWQModifier: {scheme: W4A16, ignore: [lm_head], n_grid: 4}\n"
    result = oneshot(model=str(model_dir), recipe=recipe, dataset=str(text_file), num_calibration_samples=4)
    rows = result.report["modules"]
    assert {r["modifier"] for r in rows} == {"AWQModifier"}
    assert sum("weight_error" in r for r in rows) == 7 * 2  # every Linear of both layers rounded


def test_awq_then_gptq_in_one_stage(model_dir, text_file):
    pytest.importorskip("llmc_gptq")
    recipe = (
        "quant_stage:\n  quant_modifiers:\n    AWQModifier: {n_grid: 4}\n"
        "    GPTQModifier: {scheme: W4A16, ignore: [lm_head]}\n"
    )
    result = oneshot(model=str(model_dir), recipe=recipe, dataset=str(text_file), num_calibration_samples=4)
    gptq = [r for r in result.report["modules"] if r["modifier"] == "GPTQModifier"]
    assert len(gptq) == 7 * 2 and all(r["output_error"] < 0.5 for r in gptq)


def _problem(text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(text, load_registry())
    return str(caught.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{n_grid: 1, scheme: W4A16}", r"'n_grid' must be an integer of at least 2.*\(got 1\)"),
        ("{n_grid: '20', scheme: W4A16}", r"n_grid"),
        ("{duo_scaling: 'yes', scheme: W4A16}", r"'duo_scaling' must be true, false or 'both' \(got 'yes'\)"),
        ("{n_grd: 20, scheme: W4A16}", r"n_grd: unknown parameter; did you mean 'n_grid'\?"),
        ("{offload_device: 'gpu0', scheme: W4A16}", r"'offload_device' must be a device such as 'cpu'"),
        ("{mappings: [{smooth: x}], scheme: W4A16}", r"unknown key 'smooth'; did you mean 'smooth_layer'\?"),
        ("{mappings: [], scheme: W4A16}", r"'mappings' must be a non-empty list"),
        ("{scheme: W5A61}", r"W5A61"),
    ],
    ids=["n_grid-1", "n_grid-str", "duo", "typo", "device", "mapping-key", "mapping-empty", "scheme"],
)
def test_bad_awq_parameters_are_one_line_recipe_errors(params, message):
    text = _problem(f"quant_stage:\n  quant_modifiers:\n    AWQModifier: {params}\n")
    assert len(text.strip().splitlines()) == 1, text  # one line, with the path and the line number
    assert text.startswith("invalid recipe: quant_stage.quant_modifiers.AWQModifier") and "(<recipe string>:3)" in text
    assert re.search(message, text), text


def test_bad_smoothquant_parameters():
    assert "smoothing_strength" in _problem("s_stage:\n  s_modifiers:\n    SmoothQuantModifier: {smoothing_strength: 1.5}\n")
    with pytest.raises(ArgumentError, match=r"'smoothing_strength' must be a number in \[0, 1\]"):
        SmoothQuantModifier(smoothing_strength=-0.1)
    with pytest.raises(ArgumentError, match=r"SmoothQuantModifier has no parameter 'alpha'"):
        SmoothQuantModifier(alpha=0.5)


@pytest.mark.parametrize(
    ("modifiers", "message"),
    [
        ("    AWQModifier: {}\n", r"AWQModifier has no scheme to search with: give it scheme .* or put a QuantizationModifier or GPTQModifier after it in the same stage"),
        ("    AWQModifier: {scheme: W4A16}\n    QuantizationModifier: {scheme: W4A16}\n", r"give the scheme to one of them"),
        ("    QuantizationModifier: {scheme: W4A16}\n    AWQModifier: {}\n", r"AWQModifier comes after QuantizationModifier in its stage"),
        ("    QuantizationModifier: {scheme: W8A8}\n    SmoothQuantModifier: {}\n", r"SmoothQuantModifier comes after QuantizationModifier"),
    ],
    ids=["scheme-less-alone", "two-schemes", "awq-after-quantizer", "smoothquant-after-quantizer"],
)
def test_stage_layout_errors_come_before_the_model_loads(modifiers, message, tmp_path):
    recipe = "quant_stage:\n  quant_modifiers:\n" + modifiers
    with pytest.raises(RecipeError, match=message):
        oneshot(model=str(tmp_path / "no-such-model"), recipe=recipe, dataset="llmc:stdlib-docs")


def test_a_mapping_naming_no_module_gets_the_closest_name(model_dir, text_file):
    modifier = AWQModifier(
        mappings=[{"smooth_layer": "re:.*input_layrnorm", "balance_layers": ["re:.*q_proj"]}], n_grid=4
    )
    from llmc.modifiers.quantization import QuantizationModifier

    with pytest.raises(CalibrationError, match=r"mapping 0: smooth_layer 're:\.\*input_layrnorm' matches no module of LlamaForCausalLM; did you mean a pattern for 'input_layernorm'\?"):
        oneshot(model=str(model_dir), recipe=[modifier, QuantizationModifier(scheme="W4A16")],
                dataset=str(text_file), num_calibration_samples=2)


def test_python_api_checks_like_recipes():
    with pytest.raises(ArgumentError, match=r"'n_grid' must be at least 4 with duo_scaling 'both'"):
        AWQModifier(duo_scaling="both", n_grid=3, scheme="W4A16")
    modifier = AWQModifier(mappings=[[["re:.*q_proj"], "re:.*input_layernorm"]])  # SmoothQuant's form
    assert modifier.mappings[0].smooth_layer == "re:.*input_layernorm"
    assert modifier.mappings[0].balance_layers == ("re:.*q_proj",)


@pytest.mark.parametrize("setting", [{"calibration_precision": "bfloat16"}, {"precision": "bfloat16"}], ids=["bf16-autocast", "bf16-model"])
def test_awq_runs_in_bfloat16(model_dir, text_file, setting):
    recipe = "quant_stage:\n  quant_modifiers:\n    AWQModifier: {n_grid: 4}\n    QuantizationModifier: {scheme: W4A16}\n"
    result = oneshot(model=str(model_dir), recipe=recipe, dataset=str(text_file), num_calibration_samples=4, **setting)
    smoothed = [r for r in result.report["modules"] if r["modifier"] == "AWQModifier"]
    assert len(smoothed) == 3 * 2  # the mappings are found with bf16's tolerance too
    assert all(r["output_error"] <= r["rtn_output_error"] for r in smoothed)


@pytest.mark.parametrize("name", ["llmc:awq_w4a16_asym", "llmc:smoothquant_w8a8"])
def test_shipped_recipes_load_and_validate(name):
    recipe = load_recipe(name, load_registry())
    kinds = [type(entry.modifier).__name__ for entry in recipe.modifiers]
    assert kinds[0] in ("AWQModifier", "SmoothQuantModifier") and kinds[1] == "QuantizationModifier"
    from llmc.entrypoints.stages import ONESHOT, check_stage_kinds

    assert check_stage_kinds(recipe, ONESHOT) == ["oneshot"]


def test_awq_with_nvfp4_shares_one_global_scale_per_fused_matrix(model_dir, text_file):
    """q/k/v and gate/up are one matrix in vLLM, whose NVFP4 kernel takes one global scale."""
    recipe = "quant_stage:\n  quant_modifiers:\n    AWQModifier: {scheme: NVFP4A16, ignore: [lm_head], n_grid: 4}\n"
    result = oneshot(model=str(model_dir), recipe=recipe, dataset=str(text_file), num_calibration_samples=4)
    layer = result.model.model.layers[0]
    q, k, v = (getattr(layer.self_attn, f"{p}_proj").weight_global_scale for p in "qkv")
    gate, up = layer.mlp.gate_proj.weight_global_scale, layer.mlp.up_proj.weight_global_scale
    assert torch.equal(q, k) and torch.equal(q, v) and torch.equal(gate, up)
