"""GPTQModifier in a run: layer order, true-sequential stages, masks, checkpoints that load."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from llmc import RunContext, oneshot
from llmc import statistics as core_statistics
from llmc.data import make_batches, padding_token_id
from llmc.masks import set_sparsity_mask_, sparsity_mask
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.quantization import is_quantized
from llmc.testing import SAMPLE_TEXT, build_causal_lm, sample_logits, solving_rows_in_parts
from llmc_gptq import GPTQModifier
from llmc_gptq import run as gptq_modifier
from llmc_gptq import statistics as gptq_statistics

pytest.importorskip("compressed_tensors")

LLAMA_STAGES = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def _recipe(params: str) -> str:
    return f"quant_stage:\n  quant_modifiers:\n    GPTQModifier: {{{params}}}\n"


def _run(model, tokenizer, modifier: GPTQModifier, **run_state):
    """The layer-by-layer pipeline with one GPTQ run state (what oneshot does, minus saving)."""
    context = RunContext(model=model, device=torch.device("cpu"), tokenizer=tokenizer)
    run = modifier.start(context)
    for name, value in run_state.items():
        setattr(run, name, value)
    samples = [tokenizer(text)["input_ids"] for text in SAMPLE_TEXT[:12]]
    batches = make_batches(samples, 4, padding_token_id(tokenizer))
    LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([run]), show_progress=False).run(batches)
    return run, context


@pytest.mark.parametrize(
    ("params", "loader"),
    [
        ("scheme: W4A16, actorder: null", "transformers"),
        ("scheme: W4A16, actorder: weight", "transformers"),
        ("scheme: W4A16_ASYM, actorder: weight, true_sequential: false", "llmc"),
        ("scheme: W8A8", "transformers"),
        ("scheme: W3A16", "transformers"),
        ("scheme: W4AFP8", "transformers"),
        ("scheme: FP8_DYNAMIC", "transformers"),
    ],
    ids=["w4a16", "w4a16-actorder", "w4a16-asym-actorder", "w8a8", "w3a16", "w4afp8", "fp8-dynamic"],
)
def test_gptq_checkpoint_loads_in_transformers_with_same_logits(model_dir, text_file, tmp_path, params, loader):
    import transformers

    from llmc.evaluate import load_model_for_eval

    result = oneshot(
        model=str(model_dir), recipe=_recipe(params + ", ignore: [lm_head]"), dataset=str(text_file),
        num_calibration_samples=8, output_dir=str(tmp_path / "out"),
    )
    if loader == "transformers":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    else:  # asymmetric zero points: through llmc's loader (works around a transformers 5.x bug)
        loaded, _ = load_model_for_eval(str(result.output_dir), precision="float32")
    ours = sample_logits(result.model, result.tokenizer)
    torch.testing.assert_close(sample_logits(loaded, result.tokenizer), ours, rtol=1e-4, atol=1e-4)
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert (sample_logits(original, result.tokenizer) - ours).abs().max() > 1e-3  # really quantized
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == (None if "actorder: null" in params else "weight")
    with safe_open(result.output_dir / "model.safetensors", "pt") as checkpoint:
        assert not [key for key in checkpoint.keys() if "g_idx" in key]  # act-order needs no g_idx
    rows = result.report["modules"]
    assert len(rows) == 2 * 7 and {row["modifier"] for row in rows} == {"GPTQModifier"}
    assert all(row["output_error"] > 0 and row["damping"] == 0.01 and row["tokens"] > 0 for row in rows)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral"])
def test_gptq_true_sequential_stages_follow_the_data_flow(tokenizer, kind):
    model = build_causal_lm(kind)
    run, context = _run(model, tokenizer, GPTQModifier(scheme="W4A16", true_sequential=True))
    ((key, layout),) = run.layouts.items()  # both layers share one layout
    assert layout == LLAMA_STAGES
    names = [row["module"] for row in context.report]
    assert names[:7] == [f"model.layers.0.{local}" for stage in LLAMA_STAGES for local in stage]
    assert all(is_quantized(module) for name, module in model.named_modules() if name.endswith("_proj"))


def test_gptq_true_sequential_calibrates_each_stage_on_quantized_inputs(tokenizer, monkeypatch):
    seen: dict[bool, dict[str, torch.Tensor]] = {}
    prepare = gptq_modifier.prepare_hessians

    def recording(hessians, **kwargs):
        for name, H in zip(kwargs["module_names"], hessians):
            seen[current].setdefault(name, H.clone())
        return prepare(hessians, **kwargs)

    monkeypatch.setattr(gptq_modifier, "prepare_hessians", recording)
    for current in (True, False):
        seen[current] = {}
        _run(build_causal_lm("llama"), tokenizer, GPTQModifier(scheme="W4A16", true_sequential=current))
    first = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(seen[True][first], seen[False][first], rtol=1e-6, atol=0)  # same inputs
    for later in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        name = f"model.layers.0.{later}"
        assert not torch.allclose(seen[True][name], seen[False][name], rtol=1e-4, atol=0), name
    # q, k and v read one tensor: one Hessian, prepared once for the three (gate and up alike)
    for shared in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        assert f"model.layers.0.{shared}" not in seen[True] and f"model.layers.0.{shared}" not in seen[False]


def test_gptq_more_groups_than_stages_fall_back_to_two_passes(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(core_statistics, "MAX_STAGES", 2)
    with caplog.at_level(logging.INFO, logger="llmc.statistics"):
        run, context = _run(build_causal_lm("llama", layers=1), tokenizer, GPTQModifier(scheme="W4A16", true_sequential=True))
    assert "model.layers.0 has 4 input groups" in caplog.text
    assert len(context.report) == 7


def _prune_at_random(model) -> dict[str, torch.Tensor]:
    """Half of every projection's weights zeroed and masked, as a pruning step leaves them."""
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            kept = torch.rand(module.weight.shape, generator=generator) > 0.5
            with torch.no_grad():
                module.weight.mul_(kept)
            set_sparsity_mask_(module, kept)
            masks[name] = kept
    return masks


@pytest.mark.parametrize("actorder", ["weight", None], ids=["actorder", "columns"])
def test_gptq_keeps_a_pruning_mask(tokenizer, actorder):
    model = build_causal_lm("llama")
    masks = _prune_at_random(model)
    _run(model, tokenizer, GPTQModifier(scheme="W4A16", actorder=actorder))
    for name, kept in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~kept] == 0), name
        assert torch.count_nonzero(weight) > 0.3 * weight.numel(), name  # small kept weights may round to 0


def test_gptq_told_not_to_keep_a_mask_refills_the_zeros_and_drops_the_mask(tokenizer):
    """llm-compressor 0.14's behaviour, for comparisons: its 2:4 + GPTQ checkpoint is dense."""
    model = build_causal_lm("llama", layers=1)
    masks = _prune_at_random(model)
    _run(model, tokenizer, GPTQModifier(scheme="W8A16"), keep_sparsity_mask=False)
    for name, kept in masks.items():
        module = model.get_submodule(name)
        assert sparsity_mask(module) is None, name
        refilled = torch.count_nonzero(module.weight.detach()[~kept]) / (~kept).sum()
        assert refilled > 0.05, (name, float(refilled))  # kept: exactly 0 (the test above)


def test_gptq_targeted_lm_head_is_rounded_at_finalize(tokenizer, caplog):
    model = build_causal_lm("llama", layers=1)
    with caplog.at_level(logging.WARNING, logger="llmc.gptq"):
        _, context = _run(model, tokenizer, GPTQModifier(scheme="W8A16", ignore=[]))
    assert "lm_head lies outside the calibrated layers: quantized by round-to-nearest" in caplog.text
    (row,) = [row for row in context.report if row["module"] == "lm_head"]
    assert row["method"] == "round-to-nearest" and is_quantized(model.lm_head)


def test_gptq_torch_and_numba_backends_give_the_same_model(tokenizer):
    models = {}
    for backend in ("numba", "torch"):
        models[backend] = build_causal_lm("llama", layers=1)
        _run(models[backend], tokenizer, GPTQModifier(scheme="W4A16"), backend=backend)
    for (name, fast), (_, reference) in zip(models["numba"].named_parameters(), models["torch"].named_parameters()):
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-6, msg=name)


def test_gptq_no_target_is_an_error(tokenizer):
    from llmc.errors import CalibrationError

    with pytest.raises(CalibrationError, match=r"GPTQModifier targets \['Conv2d'\] \(ignoring \['lm_head'\]\) match no Linear module"):
        _run(build_causal_lm("llama", layers=1), tokenizer, GPTQModifier(scheme="W4A16", targets=["Conv2d"]))


def test_gptq_group_size_that_does_not_divide_a_width_stops_or_is_skipped(tokenizer):
    from llmc.errors import CalibrationError

    model = build_causal_lm("llama", hidden=192, layers=1)  # 192 is not a multiple of 128; 384 is
    with pytest.raises(CalibrationError, match=r"group size 128 does not divide the input width 192 of model.layers.0.self_attn.q_proj"):
        _run(model, tokenizer, GPTQModifier(scheme="W4A16"))
    run, context = _run(model, tokenizer, GPTQModifier(scheme="W4A16", skip_incompatible=True))
    assert [row["module"] for row in context.report] == ["model.layers.0.mlp.down_proj"]


def test_gptq_output_error_same_from_outputs_or_from_the_hessian(tokenizer, monkeypatch):
    reports = {}
    for threshold in (10**9, 0):  # never / always read trace(W H Wᵀ) from the Linear outputs
        monkeypatch.setattr(gptq_statistics, "ENERGY_FROM_OUTPUTS_MIN_COLS", threshold)
        _, context = _run(build_causal_lm("llama", layers=1), tokenizer, GPTQModifier(scheme="W4A16"))
        reports[threshold] = [row["output_error"] for row in context.report]
    assert reports[0] == pytest.approx(reports[10**9], rel=1e-4)
    assert all(0 < error < 0.1 for error in reports[0])


def test_gptq_cuts_calibration_batches_short_only_when_alone(tokenizer):
    """Past the last target Linear's input the forward is useless to GPTQ and is skipped, unless
    some other hook (another modifier's) is on the layer; the result is the same either way."""
    counts, weights = {}, {}
    for alone in (True, False):
        model = build_causal_lm("llama")
        calls = [0, 0]

        def counting(x, down, index, calls=calls):
            calls[index] += 1
            return torch.nn.Linear.forward(down, x)

        for index, layer in enumerate(model.model.layers):
            down = layer.mlp.down_proj
            down.forward = lambda x, down=down, index=index: counting(x, down, index)
            if not alone:
                layer.register_forward_hook(lambda *args: None)  # someone else's statistics
        _run(model, tokenizer, GPTQModifier(scheme="W4A16"))
        counts[alone], weights[alone] = calls, model.model.layers[1].mlp.down_proj.weight.detach().clone()
    batches = 3  # 12 samples in batches of 4
    # layer 0: the first batch runs whole (the layout is learned), then the propagation pass;
    # layer 1 reuses the layout, and the last layer needs no propagation pass
    assert counts[True] == [1 + batches, 0]
    assert counts[False] == [2 * batches, batches]
    assert torch.equal(weights[True], weights[False])


@pytest.mark.parametrize("scheme", ["NVFP4A16", "MXFP4A16", "FP8_BLOCK"])
def test_gptq_float_group_and_block_schemes_load_with_the_same_logits(text_file, tmp_path, scheme):
    """GPTQ onto FP4 groups under a global scale (NVFP4), E8M0 groups (MX) and FP8 blocks: the
    checkpoint loads in transformers with our logits. In bfloat16, because compressed-tensors
    decompresses FP4/MX weights to bfloat16 whatever the model's dtype."""
    import transformers

    result = oneshot(
        model="llmc:tiny-llama", precision="bfloat16",
        recipe=_recipe(f"scheme: {scheme}, ignore: [lm_head]"), dataset=str(text_file),
        num_calibration_samples=8, output_dir=str(tmp_path / "out"),
    )
    rows = result.report["modules"]
    assert rows and all(row["modifier"] == "GPTQModifier" and row["tokens"] > 0 for row in rows)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ours = sample_logits(result.model, result.tokenizer)
    torch.testing.assert_close(sample_logits(loaded, result.tokenizer), ours, rtol=0, atol=0)
    if scheme == "NVFP4A16":  # q/k/v share one global scale, as vLLM's fused qkv_proj needs
        with safe_open(result.output_dir / "model.safetensors", "pt") as checkpoint:
            scales = [checkpoint.get_tensor(f"model.layers.0.self_attn.{p}_proj.weight_global_scale") for p in "qkv"]
        assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


@pytest.mark.parametrize("params", [{"actorder": None}, {"actorder": "weight"}, {"scheme": "W8A8"}])
def test_rows_solved_in_parts_and_joined_equal_the_whole_solve_bit_for_bit(tokenizer, monkeypatch, params):
    """What ranks do with a group too large for one (``llmc.distributed.RowSplit``: one
    factorisation, the rows in parts, joined) gives the weights of solving it whole."""
    modifier = {"scheme": "W4A16", **params}
    whole_run, whole = _run(build_causal_lm("llama"), tokenizer, GPTQModifier(**modifier))
    in_parts, split_groups = solving_rows_in_parts(gptq_modifier.GPTQRun)
    monkeypatch.setattr(gptq_modifier.GPTQRun, "_compute_group", in_parts)
    _, parted = _run(build_causal_lm("llama"), tokenizer, GPTQModifier(**modifier))
    (layout,) = whole_run.layouts.values()
    assert len(split_groups) == parted.model.config.num_hidden_layers * len(layout)  # every group of every layer
    expected = whole.model.state_dict()
    for key, value in parted.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    rows = {row["module"]: row for row in whole.report}
    for row in parted.report:
        if "output_error" in row:
            assert row["tokens"] == rows[row["module"]]["tokens"]
            assert row["output_error"] == pytest.approx(rows[row["module"]]["output_error"], rel=1e-6, abs=1e-12)
