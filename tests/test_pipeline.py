"""The layer-by-layer pipeline: block discovery, capture, and error propagation."""

from __future__ import annotations

import llmc_test_plugin as recorder_plugin
import pytest
import torch
from plugin_entry_points import TEST_PLUGIN

from llmc import hookimpl
from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.pipeline import LayerwisePipeline, StopLayerForward, find_blocks, make_lifecycle
from llmc.testing import build_causal_lm


def test_find_blocks_decoder_layers():
    model = build_causal_lm("llama", layers=3)
    names = [name for name, _ in find_blocks(model)]
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]


def test_find_blocks_by_sequential_targets():
    model = build_causal_lm("llama", layers=2)
    blocks = find_blocks(model, ["LlamaMLP"])
    assert [name for name, _ in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(CalibrationError, match=r"sequential_targets \['NoSuchBlock'\] match no module"):
        find_blocks(model, ["NoSuchBlock"])


def _batches(vocab: int, lengths=(12, 9, 12)) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for length in lengths:
        ids = torch.randint(4, vocab, (2, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, length - 3:] = 0  # right padding on the second row
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _run_recorder(model, batches):
    recorder_plugin.RUNS.clear()
    context = RunContext(model=model, device=torch.device("cpu"))
    run = recorder_plugin.RecordInputsModifier().start(context)
    LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([run]), show_progress=False).run(batches)
    return run


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_pipeline_block_inputs_equal_model_hidden_states(kind):
    """What each block is fed equals what the whole model feeds it (no architecture code)."""
    model = build_causal_lm(kind, layers=3)
    batches = _batches(model.config.vocab_size)
    run = _run_recorder(model, batches)
    for index, name in enumerate(f"model.layers.{i}" for i in range(3)):
        for batch, seen in zip(batches, run.inputs[name]):
            with torch.no_grad():
                expected = model(**batch, output_hidden_states=True).hidden_states[index]
            torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-5)
    assert run.masks_seen == 3 * len(batches)


def test_pipeline_bert_encoder_without_model_specific_code():
    import transformers

    config = transformers.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    batches = _batches(200, lengths=(10, 10))
    run = _run_recorder(model, batches)
    assert list(run.inputs) == ["encoder.layer.0", "encoder.layer.1"]
    for batch, seen in zip(batches, run.inputs["encoder.layer.1"]):
        with torch.no_grad():
            expected = model(**batch, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-5)


def test_pipeline_propagates_from_compressed_layers(monkeypatch, tiny_model_dir, text_file):
    """Block i is fed by blocks < i *after* they were compressed (GPTQ-style error propagation)."""
    import llmc.plugins
    from llmc import oneshot

    real = llmc.plugins.importlib.metadata.entry_points
    monkeypatch.setattr(
        llmc.plugins.importlib.metadata, "entry_points",
        lambda group=None: [TEST_PLUGIN] if group == "llmc" else real(group=group),
    )
    recorder_plugin.RUNS.clear()
    recipe = (
        "quant_stage:\n  quant_modifiers:\n"
        "    - acme.RecordInputsModifier: {}\n"
        "    - core.QuantizationModifier: {scheme: W4A16_ASYM}\n"
    )
    result = oneshot(
        model=str(tiny_model_dir), recipe=recipe, dataset=str(text_file),
        num_calibration_samples=6, max_seq_length=16, batch_size=3, shuffle_calibration_samples=False,
    )
    (run,) = recorder_plugin.RUNS
    from llmc.args import DatasetArguments
    from llmc.data import load_calibration_data, make_batches

    samples = load_calibration_data(
        DatasetArguments(dataset=str(text_file), num_calibration_samples=6, max_seq_length=16,
                         shuffle_calibration_samples=False), result.tokenizer)
    batches = make_batches(samples, 3, result.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = [result.model(**b, output_hidden_states=True).hidden_states for b in batches]
    for index in range(2):
        for batch_index, seen in enumerate(run.inputs[f"model.layers.{index}"]):
            torch.testing.assert_close(seen, hidden[batch_index][index], rtol=1e-5, atol=1e-5)
    # and the compressed layers really differ from the original ones
    assert result.report["summary"]["QuantizationModifier"]["mean_weight_error"] > 0


class _PartialPasses:
    """A run state that re-runs its block and stops batches early, like true-sequential GPTQ."""

    def __init__(self):
        self.mlp_inputs = 0
        self.stopped = 0

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):
        return False

    @hookimpl
    def llmc_layer_end(self, context, layer_name, layer):
        from llmc.pipeline import StopLayerForward

        def stop_at_mlp(module, args):
            self.mlp_inputs += 1
            raise StopLayerForward

        handle = layer.mlp.register_forward_pre_hook(stop_at_mlp)
        context.forward_layer()
        handle.remove()


def test_pipeline_forward_layer_reruns_block_and_stops_early():
    model = build_causal_lm("llama", layers=2)
    batches = _batches(model.config.vocab_size)
    context = RunContext(model=model, device=torch.device("cpu"))
    state = _PartialPasses()
    LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([state]), show_progress=False).run(batches)
    assert state.mlp_inputs == 2 * len(batches)
    assert context.forward_layer is None


def _hook_tables(model):
    """Every hook (and its flags) on every module, by handle id, to compare before and after."""
    tables = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return {name: {table: dict(getattr(module, table, {})) for table in tables} for name, module in model.named_modules()}


class _FailsAtLayer:
    """Hooks modules the way calibrating modifiers do, then raises in the middle of the run."""

    def __init__(self, fail_at, fail_in="llmc_layer_end"):
        self.fail_at = fail_at
        self.fail_in = fail_in
        self.calls = []

    def _maybe_fail(self, hook_name, layer_name):
        if hook_name == self.fail_in and layer_name == self.fail_at:
            raise CalibrationError(f"cannot compress {layer_name}", module=layer_name)

    @hookimpl
    def llmc_initialize(self, context):
        self.calls.append("initialize")
        context.model.lm_head.register_forward_pre_hook(lambda module, args: None)

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):
        self.calls.append(f"layer_start:{layer_name}")
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args, kwargs: None, with_kwargs=True)
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, output: None, always_call=True)
        layer.mlp.register_full_backward_hook(lambda module, grad_in, grad_out: None)

        def stop(module, args):
            raise StopLayerForward

        layer.mlp.up_proj.register_forward_pre_hook(stop)  # fatal if it outlived the run
        return True

    @hookimpl
    def llmc_layer_end(self, context, layer_name, layer):
        self.calls.append(f"layer_end:{layer_name}")
        self._maybe_fail("llmc_layer_end", layer_name)
        layer.mlp.up_proj._forward_pre_hooks.clear()  # done with the stop hook; keeps the others

    @hookimpl
    def llmc_finalize(self, context):
        self.calls.append("finalize")


@pytest.mark.parametrize(
    ("fail_at", "fail_in"),
    [("model.layers.1", "llmc_layer_end"), ("model.layers.0", "forward")],
    ids=["modifier-raises", "forward-raises"],
)
def test_pipeline_failure_leaves_the_model_hooks_it_had_before(fail_at, fail_in):
    model = build_causal_lm("llama", layers=3)
    batches = _batches(model.config.vocab_size)
    calls = []
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: calls.append(1))  # the caller's
    before = _hook_tables(model)
    state = _FailsAtLayer(fail_at, fail_in)
    if fail_in == "forward":  # an exception from the block itself, during the calibration pass
        def broken(module, args):
            raise RuntimeError("out of memory")

        model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(broken)
        before = _hook_tables(model)
    context = RunContext(model=model, device=torch.device("cpu"))
    pipeline = LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([state]), show_progress=False)
    with pytest.raises(CalibrationError if fail_in == "llmc_layer_end" else RuntimeError):
        pipeline.run(batches)
    assert _hook_tables(model) == before
    assert "finalize" not in state.calls  # no compression after a failure
    assert context.forward_layer is None and context.attention_mask is None
    if fail_in == "llmc_layer_end":
        calls.clear()
        with torch.no_grad():
            model(**batches[0])  # no calibration hook left to stop or slow the forward
        assert calls == [1]


def test_pipeline_success_keeps_hooks_modifiers_leave_on_purpose():
    model = build_causal_lm("llama", layers=2)
    state = _FailsAtLayer(fail_at=None)
    context = RunContext(model=model, device=torch.device("cpu"))
    LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([state]), show_progress=False).run(
        _batches(model.config.vocab_size)
    )
    assert state.calls[-1] == "finalize"
    assert all(len(layer.mlp.down_proj._forward_pre_hooks) == 1 for layer in model.model.layers)
