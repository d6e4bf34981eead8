"""train: fine-tuning with the recipe's training modifiers hooked into every step."""

from __future__ import annotations

import llmc_test_plugin as recorder_plugin
import pytest
import torch
from plugin_entry_points import TEST_PLUGIN

from llmc import oneshot, train
from llmc.errors import ArgumentError, RecipeError


@pytest.fixture
def with_test_plugin(monkeypatch):
    import llmc.plugins

    real = llmc.plugins.importlib.metadata.entry_points
    monkeypatch.setattr(
        llmc.plugins.importlib.metadata, "entry_points",
        lambda group=None: [TEST_PLUGIN] if group == "llmc" else real(group=group),
    )
    recorder_plugin.RUNS.clear()


def test_train_without_recipe_lowers_the_loss(tiny_model_dir, text_file, tmp_path):
    result = train(
        model=str(tiny_model_dir), dataset=str(text_file), max_seq_length=24, max_steps=12,
        train_batch_size=8, learning_rate=3e-3, warmup_steps=2, output_dir=str(tmp_path / "ft"),
    )
    losses = result.report["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (result.output_dir / "model.safetensors").exists()


def test_train_calls_training_hooks_in_order(with_test_plugin, tiny_model_dir, text_file):
    recipe = "finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {extra_loss: 0.5}\n"
    result = train(
        model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
        max_steps=2, train_batch_size=4, gradient_accumulation_steps=2,
    )
    (run,) = recorder_plugin.RUNS
    assert run.calls == [
        "initialize", "train_start:2",
        "batch_start:0", "loss:0", "loss:0", "after_backward:0:True", "step_end:0",
        "batch_start:1", "loss:1", "loss:1", "after_backward:1:True", "step_end:1",
        "train_end", "finalize",
    ]
    assert result.report["first_loss"] > 0.5  # the modifier's extra term was added


def test_train_runs_oneshot_stage_then_training_stage(with_test_plugin, tiny_model_dir, text_file, tmp_path):
    recipe = (
        "quant_stage:\n  quant_modifiers:\n    core.QuantizationModifier: {scheme: W8A16}\n"
        "finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {}\n"
    )
    result = train(
        model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
        max_steps=1, train_batch_size=4,
    )
    assert result.report["summary"]["QuantizationModifier"]["modules"] == 14
    assert recorder_plugin.RUNS[0].calls[0] == "initialize"


def test_oneshot_refuses_a_training_stage(with_test_plugin, tiny_model_dir):
    recipe = "finetune_stage:\n  run_type: train\n  train_modifiers:\n    RecordTrainingModifier: {}\n"
    with pytest.raises(RecipeError, match=r"finetune_stage is a training stage; run the recipe with llmc train"):
        oneshot(model=str(tiny_model_dir), recipe=recipe)


def test_train_refuses_training_stage_with_oneshot_only_modifier(tiny_model_dir):
    recipe = "finetune_stage:\n  run_type: train\n  m_modifiers:\n    QuantizationModifier: {scheme: W4A16}\n"
    with pytest.raises(RecipeError, match=r"finetune_stage.QuantizationModifier cannot run in a training stage"):
        train(model=str(tiny_model_dir), recipe=recipe, dataset="unused")


def test_train_arguments_validated():
    with pytest.raises(ArgumentError, match=r"'lr_scheduler' must be in \('cosine', 'linear', 'constant'\)"):
        train(model="x", lr_scheduler="cosin")
    with pytest.raises(ArgumentError, match=r"'learning_rate' must be a positive number \(got -1.0\)"):
        train(model="x", learning_rate=-1)


def test_train_masks_padding_in_labels(tiny_model_dir, tmp_path):
    """Samples of different lengths in one batch: padded tokens must not enter the loss."""
    import json

    data = tmp_path / "uneven.jsonl"
    data.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "a much longer line of text " * 3}) + "\n")
    result = train(model=str(tiny_model_dir), dataset=str(data), max_steps=1, train_batch_size=2,
                   learning_rate=1e-9, max_seq_length=32)
    assert torch.isfinite(torch.tensor(result.report["losses"])).all()
