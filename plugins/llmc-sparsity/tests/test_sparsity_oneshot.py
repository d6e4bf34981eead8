"""The modifiers through ``oneshot``: recipes, reports, checkpoints that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from llmc import oneshot
from llmc.errors import CalibrationError, RecipeError
from llmc.masks import sparsity_mask
from llmc.plugins import load_registry
from llmc.recipe import load_recipe, recipe_to_yaml
from llmc.testing import build_causal_lm, sample_logits, solving_rows_in_parts
from llmc_sparsity import SparseGPTModifier, checkpoint_sparsity_config
from llmc_sparsity.config import mask_structure_of

pytest.importorskip("compressed_tensors")

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _group(recipe: str) -> str:
    """A one-modifier recipe string ("Name: {...}") inside a modifier group; names pass through."""
    if recipe.startswith("llmc:") or "_modifiers:" in recipe or "_stage:" in recipe:
        return recipe
    return "pruning_modifiers:\n" + "".join(f"  {line}\n" for line in recipe.splitlines())


def _prune(model_dir, text_file, recipe, **kwargs):
    return oneshot(
        model=str(model_dir), recipe=_group(recipe), dataset=str(text_file),
        num_calibration_samples=16, max_seq_length=64, **kwargs,
    )


def _pruned_rows(report):
    return [row for row in report["modules"] if "sparsity" in row]


@pytest.mark.parametrize(
    ("recipe", "structure"),
    [
        pytest.param("SparseGPTModifier: {sparsity: 0.6}", "unstructured", id="sparsegpt-60"),
        pytest.param("llmc:sparsegpt_2of4", "2:4", id="sparsegpt-2of4"),
        pytest.param("WandaPruningModifier: {sparsity: 0.5}", "unstructured", id="wanda-50"),
        pytest.param("WandaPruningModifier: {mask_structure: '4:8'}", "4:8", id="wanda-4of8"),
        pytest.param("MagnitudePruningModifier: {final_sparsity: 0.3}", "unstructured", id="magnitude-30"),
    ],
)
def test_sparsity_oneshot_report_lists_sparsity_reached_per_layer(model_dir, text_file, recipe, structure):
    result = _prune(model_dir, text_file, recipe)
    rows = _pruned_rows(result.report)
    assert len(rows) == 2 * LINEARS_PER_LAYER  # lm_head is ignored by default
    for row in rows:
        module = result.model.get_submodule(row["module"])
        weight = module.weight.detach()
        assert row["mask_structure"] == structure
        assert row["sparsity"] == pytest.approx(row["target_sparsity"], abs=0.5 / module.in_features)
        assert float((weight == 0).float().mean()) >= row["sparsity"] - 1e-6
        kept = sparsity_mask(module)
        assert kept is not None and torch.all(weight[~kept] == 0)
        if structure != "unstructured":
            keep_n, group_m = map(int, structure.split(":"))
            assert torch.all(kept.reshape(kept.shape[0], -1, group_m).sum(-1) == keep_n)
    assert sparsity_mask(result.model.lm_head) is None
    assert result.report["checkpoint_config"]["sparsity_config"]["ignore"] == ["lm_head"]


def test_sparsity_wanda_prunes_exactly_per_output_row(model_dir, text_file):
    result = _prune(model_dir, text_file, "WandaPruningModifier: {sparsity: 0.5}")
    for row in _pruned_rows(result.report):
        kept = sparsity_mask(result.model.get_submodule(row["module"]))
        assert torch.all((~kept).sum(1) == kept.shape[1] // 2)


def test_sparsity_checkpoint_of_sparse_model_loads_in_transformers(model_dir, text_file, tmp_path, tokenizer):
    import transformers

    result = _prune(model_dir, text_file, "llmc:sparsegpt_50", output_dir=str(tmp_path / "out"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(sample_logits(loaded, tokenizer), sample_logits(result.model, tokenizer), rtol=1e-5, atol=1e-5)
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain dense checkpoint: no compressed-tensors needed
    q_proj = loaded.model.layers[0].self_attn.q_proj.weight
    assert float((q_proj == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("recipe", ["llmc:sparsegpt_2of4_w4a16", "gptq"])
def test_sparsity_pruned_then_quantized_weights_keep_their_zeros(model_dir, text_file, tmp_path, tokenizer, recipe):
    """2:4 then W4A16: quantization must not refill pruned weights, in memory or on disk."""
    import transformers

    if recipe == "gptq":
        registry = load_registry()
        if "GPTQModifier" not in registry.modifiers:
            pytest.skip("llmc-gptq does not provide GPTQModifier yet")
        recipe = (
            "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: {mask_structure: '2:4'}\n"
            "    GPTQModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head]}\n"
        )
    result = _prune(model_dir, text_file, recipe, output_dir=str(tmp_path / "out"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(sample_logits(loaded, tokenizer), sample_logits(result.model, tokenizer), rtol=1e-4, atol=1e-4)
    checked = 0
    for name, module in result.model.named_modules():
        kept = sparsity_mask(module)
        if kept is None:
            continue
        assert hasattr(module, "weight_scale"), f"{name} was not quantized"
        assert torch.all(module.weight.detach()[~kept] == 0), f"{name}: pruned weights refilled"
        on_disk = loaded.get_submodule(name).weight.detach()
        assert torch.all(on_disk[~kept] == 0), f"{name}: pruned weights non-zero in the checkpoint"
        assert mask_structure_of(on_disk != 0) == (2, 4) or torch.all(
            (on_disk != 0).reshape(on_disk.shape[0], -1, 4).sum(-1) <= 2
        )
        checked += 1
    assert checked == 2 * LINEARS_PER_LAYER
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_sparsity_config_in_quantization_config_loads_with_same_logits(model_dir, text_file, tmp_path, tokenizer):
    """The record we ask core to write (quantization_config.sparsity_config) breaks no loader."""
    import transformers
    from compressed_tensors.config import SparsityCompressionConfig

    result = _prune(model_dir, text_file, "llmc:sparsegpt_2of4_w4a16", output_dir=str(tmp_path / "out"))
    record = checkpoint_sparsity_config(result.model)
    assert record["sparsity_structure"] == "2:4" and record["format"] == "dense"
    assert record["ignore"] == ["lm_head"] and record["targets"] is None
    pruned = sum(int((~sparsity_mask(m)).sum()) for m in result.model.modules() if sparsity_mask(m) is not None)
    total = sum(p.numel() for p in result.model.parameters())
    assert record["global_sparsity"] == pytest.approx(pruned / total, abs=1e-6)
    # what vLLM does with it: validate it as compressed-tensors' config; targets None → no sparse kernels
    parsed = SparsityCompressionConfig.model_validate(record)
    assert parsed.sparsity_structure == "2:4" and not parsed.targets
    # core wrote it through the plugin's llmc_checkpoint_config hook; transformers loads it
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"] == record
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(sample_logits(loaded, tokenizer), sample_logits(result.model, tokenizer), rtol=1e-4, atol=1e-4)
    assert result.report["checkpoint_config"]["sparsity_config"] == record
    report = json.loads((result.output_dir / "llmc_report.json").read_text())
    assert report["checkpoint_config"]["sparsity_config"] == record
    assert not [row for row in report["modules"] if "sparsity_config" in row]  # no pseudo-module row
    assert report["summary"]["SparseGPTModifier"]["modules"] == 2 * LINEARS_PER_LAYER


def test_sparse_only_run_reports_the_sparsity_record(model_dir, text_file, tmp_path):
    """Nothing quantized: a plain dense checkpoint (no quantization_config), the record in the report."""
    result = _prune(model_dir, text_file, "llmc:sparsegpt_2of4", output_dir=str(tmp_path / "out"))
    assert "quantization_config" not in json.loads((result.output_dir / "config.json").read_text())
    report = json.loads((result.output_dir / "llmc_report.json").read_text())
    assert report["checkpoint_config"]["sparsity_config"]["sparsity_structure"] == "2:4"


def test_sparsity_magnitude_one_shot_needs_no_data(tokenizer):
    model = build_causal_lm()
    result = oneshot(model=model, tokenizer=tokenizer, recipe=_group("MagnitudePruningModifier: {mask_structure: '2:4'}"))
    assert result.report["calibration_samples"] == 0
    assert all(row["sparsity"] == 0.5 for row in _pruned_rows(result.report))


def test_sparsity_per_layer_values(model_dir, text_file):
    recipe = (
        "SparseGPTModifier:\n"
        "  sparsity: {'re:.*mlp.*': 0.7, 'model.layers.0.self_attn.q_proj': 0.2, 're:.*': 0.4}\n"
    )
    result = _prune(model_dir, text_file, recipe)
    targets = {row["module"]: row["target_sparsity"] for row in _pruned_rows(result.report)}
    assert targets["model.layers.1.mlp.down_proj"] == 0.7
    assert targets["model.layers.0.self_attn.q_proj"] == 0.2
    assert targets["model.layers.1.self_attn.q_proj"] == 0.4
    listed = _prune(model_dir, text_file, "WandaPruningModifier: {sparsity: [0.3, 0.6]}")
    rows = {row["module"]: row for row in _pruned_rows(listed.report)}
    assert rows["model.layers.0.mlp.up_proj"]["target_sparsity"] == 0.3
    assert rows["model.layers.1.mlp.up_proj"]["target_sparsity"] == 0.6
    assert rows["model.layers.0.mlp.up_proj"]["sparsity"] == round(38 / 128, 6)  # round(0.3 · 128) per row


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("SparseGPTModifier: {sparsity: 1.5}", r"'sparsity' must be a number in \[0, 1\) \(got 1.5\)"),
        ("SparseGPTModifier: {sparsity: [0.5, 1.0]}", r"'sparsity\[1\]' must be a number in \[0, 1\) \(got 1.0\)"),
        ("SparseGPTModifier: {sparsity: {'re:(': 0.5}}", r"'sparsity' key 're:\(' is not a valid regular expression"),
        ("SparseGPTModifier: {mask_structure: '4:2'}", r"mask_structure must be '0:0' \(unstructured\) or 'N:M' with 0 < N < M"),
        ("SparseGPTModifier: {mask_structure: '2:4', sparsity: 0.6}", r"mask_structure '2:4' keeps 2 of every 4 weights \(sparsity 0.5\) but sparsity is 0.6; leave sparsity out or set it to 0.5"),
        ("SparseGPTModifier: {mask_structure: '4:8', block_size: 12}", r"block_size 12 must be a multiple of the N:M group size 8"),
        ("SparseGPTModifier: {sparsty: 0.5}", r"unknown parameter; did you mean 'sparsity'"),
        ("MagnitudePruningModifier: {start_epoch: 2, end_epoch: 1}", r"'end_epoch' \(1.0\) must not be before 'start_epoch' \(2.0\)"),
        ("MagnitudePruningModifier: {init_sparsity: 0.6, final_sparsity: 0.5}", r"'init_sparsity' \(0.6\) must not exceed 'final_sparsity' \(0.5\): masks are nested"),
        ("WandaPruningModifier: {sparsity: true}", r"'sparsity' must be a number in \[0, 1\), a list of them"),
    ],
)
def test_sparsity_recipe_errors_name_the_fix(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_group(recipe), load_registry())


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("SparseGPTModifier: {ignore: []}", r"SparseGPTModifier needs calibration inputs for lm_head, which lies outside the calibrated blocks; add it to ignore \(ignore: \[lm_head\]\)"),
        ("SparseGPTModifier: {sparsity: {'re:.*mlp.*': 0.5}}", r"SparseGPTModifier: no key of sparsity \['re:.\*mlp.\*'\] matches the targeted module model.layers.0.self_attn.q_proj; add a key for it"),
        ("WandaPruningModifier: {sparsity: [0.5, 0.5, 0.5]}", r"WandaPruningModifier: sparsity lists 3 values but the model has 2 blocks; give one value per block"),
        ("SparseGPTModifier: {targets: [Embedding]}", r"SparseGPTModifier targets \['Embedding'\] \(ignoring \['lm_head'\]\) match no Linear module of this model"),
    ],
)
def test_sparsity_model_errors_before_any_work(tokenizer, text_file, recipe, message):
    with pytest.raises(CalibrationError, match=message):
        oneshot(model=build_causal_lm(), tokenizer=tokenizer, recipe=_group(recipe), dataset=str(text_file),
                num_calibration_samples=2)


def test_sparsity_nm_width_must_divide(tokenizer, text_file):
    model = build_causal_lm(hidden=136)  # 136 input columns are not groups of 16
    with pytest.raises(CalibrationError, match=r"the input width 136 of model.layers.0.self_attn.q_proj is not a multiple of 16 \(8:16\); add it to ignore"):
        oneshot(model=model, tokenizer=tokenizer, recipe=_group("SparseGPTModifier: {mask_structure: '8:16'}"),
                dataset=str(text_file), num_calibration_samples=2)


@pytest.mark.parametrize("name", ["sparsegpt_50", "sparsegpt_2of4", "sparsegpt_2of4_w4a16"])
def test_sparsity_shipped_recipes_load_and_round_trip(name):
    registry = load_registry()
    assert registry.recipes[name][0] == "sparsity"
    recipe = load_recipe(f"llmc:{name}", registry)
    assert isinstance(recipe.modifiers[0].modifier, SparseGPTModifier)
    assert load_recipe(recipe_to_yaml(recipe, registry), registry).stages == recipe.stages


def test_sparsity_llm_compressor_recipe_loads_unchanged():
    text = """
test_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      dampening_frac: 0.001
      block_size: 128
      targets: ['Linear']
      ignore: ['re:.*lm_head']
"""
    (entry,) = load_recipe(text, load_registry()).modifiers
    assert entry.plugin == "sparsity" and entry.modifier.dampening_frac == 0.001


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W8A8", "W8A16"])
def test_sparsity_every_rtn_scheme_keeps_pruned_zeros(model_dir, text_file, scheme):
    recipe = (
        "sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier: {mask_structure: '2:4'}\n"
        f"    QuantizationModifier: {{scheme: {scheme}, ignore: [lm_head]}}\n"
    )
    result = _prune(model_dir, text_file, recipe)
    for row in _pruned_rows(result.report):
        module = result.model.get_submodule(row["module"])
        kept = sparsity_mask(module)
        assert hasattr(module, "weight_scale")
        assert torch.all(module.weight.detach()[~kept] == 0), (scheme, row["module"])


@pytest.mark.parametrize("modifier", ["SparseGPTModifier", "WandaPruningModifier"])
def test_sparsity_module_no_token_reaches_is_left_dense(tokenizer, text_file, modifier, caplog):
    model = build_causal_lm()
    model.model.layers[0].unused = torch.nn.Linear(128, 128)  # never called (an expert never routed)
    before = model.model.layers[0].unused.weight.detach().clone()
    with caplog.at_level("WARNING", logger="llmc_sparsity"):
        result = oneshot(model=model, tokenizer=tokenizer, recipe=_group(f"{modifier}: {{}}"),
                         dataset=str(text_file), num_calibration_samples=4)
    assert torch.equal(result.model.model.layers[0].unused.weight, before)
    (row,) = [r for r in result.report["modules"] if r["module"] == "model.layers.0.unused"]
    assert row["sparsity"] == 0.0 and row["skipped"] == "no calibration tokens reached it"
    assert "no calibration token reached model.layers.0.unused; it is left dense" in caplog.text
    assert len(_pruned_rows(result.report)) == 2 * LINEARS_PER_LAYER + 1


def test_sparsity_true_sequential_recalibrates_later_groups_on_pruned_outputs(tokenizer, text_file):
    results = {}
    for flag in (False, True):
        model = build_causal_lm()
        calls = []
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        results[flag] = oneshot(
            model=model, tokenizer=tokenizer, dataset=str(text_file), num_calibration_samples=8,
            recipe=_group(f"SparseGPTModifier: {{mask_structure: '2:4', true_sequential: {str(flag).lower()}}}"),
        ).model, len(calls)
    (plain, plain_calls), (sequential, sequential_calls) = results[False], results[True]
    assert sequential_calls > plain_calls  # the layer was run again for down_proj
    for name, module in plain.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        same = torch.equal(module.weight, sequential.get_submodule(name).weight)
        first_group = name.endswith(("q_proj", "k_proj", "v_proj")) and ".layers.0." in name
        assert same == first_group, name  # layer 0's q/k/v see the same inputs either way
        kept = sparsity_mask(sequential.get_submodule(name))
        assert torch.all(kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2)


@pytest.mark.parametrize(
    ("quantizer", "scheme", "fmt"),
    [
        ("GPTQModifier", "NVFP4A16", "nvfp4-pack-quantized"),
        ("GPTQModifier", "FP8_BLOCK", "float-quantized"),
        ("QuantizationModifier", "MXFP4A16", "mxfp4-pack-quantized"),
    ],
)
def test_sparsity_zeros_survive_float_schemes(model_dir, text_file, tmp_path, quantizer, scheme, fmt):
    """2:4 then an FP4/FP8 scheme (GPTQ or RTN): every grid holds an exact zero, so the pruned
    weights stay zero in memory and in the checkpoint's codes (FP4 unpacked by
    compressed-tensors' own unpacking, FP8 codes as stored)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from safetensors.torch import load_file

    if quantizer not in load_registry().modifiers:
        pytest.skip(f"{quantizer} is not installed")
    recipe = (
        "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: {mask_structure: '2:4'}\n"
        f"    {quantizer}: {{scheme: {scheme}, targets: [Linear], ignore: [lm_head]}}\n"
    )
    result = _prune(model_dir, text_file, recipe, output_dir=str(tmp_path / "out"))
    tensors = load_file(str(result.output_dir / "model.safetensors"))
    checked = 0
    for name, module in result.model.named_modules():
        kept = sparsity_mask(module)
        if kept is None:
            continue
        assert torch.all(module.weight.detach()[~kept] == 0), f"{name}: pruned weights refilled"
        packed = tensors.get(f"{name}.weight_packed")
        if packed is not None:
            codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2)
        else:
            codes = tensors[f"{name}.weight"].float()
        assert torch.all(codes[~kept] == 0), f"{name}: pruned weights non-zero in the checkpoint"
        checked += 1
    assert checked == 2 * LINEARS_PER_LAYER
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == fmt


@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_sparsegpt_rows_pruned_in_parts_and_joined_equal_the_whole_group_bit_for_bit(
    model_dir, text_file, monkeypatch, structure
):
    """What ranks do with a group too large for one (``llmc.distributed.RowSplit``: one
    factorisation, the rows in parts, joined) gives the weights and masks of pruning it whole;
    an unstructured mask, chosen over all rows at once, is never split."""
    from llmc_sparsity import sparsegpt_modifier

    recipe = f"SparseGPTModifier: {{mask_structure: '{structure}'}}"
    whole = _prune(model_dir, text_file, recipe)
    in_parts, split_groups = solving_rows_in_parts(sparsegpt_modifier.SparseGPTRun, cuts=(0.41, 0.41))
    monkeypatch.setattr(sparsegpt_modifier.SparseGPTRun, "_compute_group", in_parts)
    parted = _prune(model_dir, text_file, recipe)
    assert len(split_groups) == 2 * 4  # q/k/v, o, gate/up and down of both layers
    expected = whole.model.state_dict()
    for key, value in parted.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    losses = {row["module"]: row["obs_loss"] for row in whole.report["modules"] if "obs_loss" in row}
    assert len(losses) == 2 * LINEARS_PER_LAYER
    for row in parted.report["modules"]:
        if "obs_loss" in row:
            assert row["obs_loss"] == pytest.approx(losses[row["module"]], rel=1e-6)
    split_groups.clear()
    _prune(model_dir, text_file, "SparseGPTModifier: {sparsity: 0.5}")
    assert not split_groups


def test_sparsegpt_and_gptq_of_one_stage_gather_each_hessian_once(model_dir, text_file, monkeypatch):
    """2:4 + W4A16 in one stage: both modifiers want every group's Hessian of the same forwards;
    sharing the one statistic halves the products and changes no weight, bit for bit."""
    if "GPTQModifier" not in load_registry().modifiers:
        pytest.skip("llmc-gptq is not installed")
    from llmc.hessian import HessianAccumulator

    recipe = (
        "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: {mask_structure: '2:4'}\n"
        "    GPTQModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head]}\n"
    )
    products = []
    update = HessianAccumulator.update

    def counted(self, x, mask=None):
        products.append(x.shape)
        update(self, x, mask)

    monkeypatch.setattr(HessianAccumulator, "update", counted)
    shared = _prune(model_dir, text_file, recipe)
    shared_products = len(products)
    products.clear()
    monkeypatch.setattr(HessianAccumulator, "share_key", property(lambda self: None))
    separate = _prune(model_dir, text_file, recipe)

    assert shared_products > 0 and len(products) == 2 * shared_products
    separate_state = separate.model.state_dict()
    for name, tensor in shared.model.state_dict().items():
        assert torch.equal(tensor, separate_state[name]), name
    def solved(report):  # what each module's solve reached, without its timings
        return [{k: v for k, v in row.items() if k != "seconds"} for row in report["modules"]]

    assert solved(shared.report) == solved(separate.report)
