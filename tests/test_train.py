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
        per_device_train_batch_size=8, learning_rate=3e-3, warmup_steps=2, output_dir=str(tmp_path / "ft"),
    )
    losses = result.report["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result.report["train_s"] > 0  # Trainer.train alone, for time per step
    assert (result.output_dir / "model.safetensors").exists()


def test_train_calls_training_hooks_in_order(with_test_plugin, tiny_model_dir, text_file):
    recipe = "finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {extra_loss: 0.5}\n"
    result = train(
        model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
        max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
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
        "quant_stage:\n  run_type: oneshot\n  quant_modifiers:\n    core.QuantizationModifier: {scheme: W8A16}\n"
        "finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {}\n"
    )
    result = train(
        model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
        max_steps=1, per_device_train_batch_size=4,
    )
    assert result.report["summary"]["QuantizationModifier"]["modules"] == 14
    assert recorder_plugin.RUNS[0].calls[0] == "initialize"


def test_oneshot_refuses_a_training_stage(with_test_plugin, tiny_model_dir):
    recipe = "finetune_stage:\n  run_type: train\n  train_modifiers:\n    RecordTrainingModifier: {}\n"
    with pytest.raises(RecipeError, match=r"finetune_stage is a training stage; run the recipe with llmc train"):
        oneshot(model=str(tiny_model_dir), recipe=recipe)


def test_train_refuses_training_stage_with_oneshot_only_modifier(with_test_plugin, tiny_model_dir):
    recipe = "finetune_stage:\n  run_type: train\n  m_modifiers:\n    RecordInputsModifier: {}\n"
    with pytest.raises(RecipeError, match=r"finetune_stage.RecordInputsModifier cannot run in a training stage"):
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
    result = train(model=str(tiny_model_dir), dataset=str(data), max_steps=1, per_device_train_batch_size=2,
                   learning_rate=1e-9, max_seq_length=32)
    assert torch.isfinite(torch.tensor(result.report["losses"])).all()


def test_train_batch_size_and_trainer_args_reach_the_trainer(with_test_plugin, tiny_model_dir, text_file):
    recipe = "finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {}\n"
    train(
        model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
        max_steps=2, per_device_train_batch_size=2, trainer_args={"optim": "sgd"},
    )
    (run,) = recorder_plugin.RUNS
    assert run.batch_sizes == [2, 2]
    assert isinstance(run.optimizer.optimizer, torch.optim.SGD)  # the Trainer's (accelerate-wrapped)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"trainer_args": {"optimm": "sgd"}},
                     r"^trainer_args: unknown transformers.TrainingArguments field 'optimm'; did you mean 'optim'\?$",
                     id="misspelled-transformers-name"),
        pytest.param({"optim": "sgd"},
                     r"^'optim' is a transformers.TrainingArguments field; pass it in trainer_args=\{'optim': ...\}",
                     id="transformers-name-at-top-level"),
        pytest.param({"per_device_train_batchsize": 2},
                     r"^unknown argument 'per_device_train_batchsize'; did you mean 'per_device_train_batch_size'\?$",
                     id="misspelled-own-name"),
        pytest.param({"trainer_args": {"learning_rate": 1.0}},
                     r"^trainer_args: 'learning_rate' is an argument of train itself; pass learning_rate=\.\.\. directly$",
                     id="own-name-in-trainer-args"),
        pytest.param({"trainer_args": {"output_dir": "x"}}, r"^trainer_args cannot set 'output_dir'",
                     id="output-dir-in-trainer-args"),
        pytest.param({"trainer_args": {"optim": "no-such-optimizer"}},
                     r"^transformers.TrainingArguments refused the training arguments: .*no-such-optimizer",
                     id="value-transformers-refuses"),
        pytest.param({"lr_scheduler": "linear", "lr_scheduler_type": "constant"},
                     r"^'lr_scheduler' is the deprecated name of 'lr_scheduler_type'; give only lr_scheduler_type",
                     id="alias-and-name"),
        pytest.param({"resume_from_checkpoint": True},
                     r"^'resume_from_checkpoint' true needs output_dir", id="resume-without-output"),
    ],
)
def test_train_refuses_bad_trainer_arguments_before_loading(kwargs, expected):
    with pytest.raises(ArgumentError, match=expected):
        train(model="no/such/model", **kwargs)


def test_train_lr_scheduler_names_are_transformers_names():
    from transformers.trainer_utils import SchedulerType

    from llmc.args import LR_SCHEDULER_TYPES, TrainingArguments

    assert set(LR_SCHEDULER_TYPES) <= {member.value for member in SchedulerType}
    # the deprecated alias keeps its meaning: warmup, then the schedule
    assert TrainingArguments(lr_scheduler="constant").scheduler_type == "constant_with_warmup"
    assert TrainingArguments(lr_scheduler="linear").scheduler_type == "linear"
    assert TrainingArguments(lr_scheduler_type="polynomial").scheduler_type == "polynomial"


def test_train_resumed_run_ends_where_an_uninterrupted_one_ends(with_test_plugin, tiny_model_dir, text_file, tmp_path):
    """max_steps=4 with save_steps=2; killed in step 3, resumed from checkpoint-2: same weights."""
    from safetensors.torch import load_file

    def run(output: str, **extra):
        fail = extra.pop("fail_at_step", -1)
        recipe = f"finetune_stage:\n  train_modifiers:\n    RecordTrainingModifier: {{fail_at_step: {fail}}}\n"
        return train(
            model=str(tiny_model_dir), dataset=str(text_file), recipe=recipe, max_seq_length=16,
            max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            weight_decay=0.1, warmup_steps=1, output_dir=str(tmp_path / output), **extra,
        )

    whole = run("whole")
    assert not (tmp_path / ".whole.train").exists()  # Trainer checkpoints removed after the save

    with pytest.raises(RuntimeError, match="stopped at step 3"):
        run("resumed", fail_at_step=3)
    scratch = tmp_path / ".resumed.train" / "finetune_stage"
    assert sorted(p.name for p in scratch.iterdir()) == ["checkpoint-2"]
    assert not (tmp_path / "resumed").exists()  # the output stays atomic: nothing until the end

    resumed = run("resumed", resume_from_checkpoint=True)
    assert resumed.report["train_steps"] == 2  # steps 3 and 4 only
    assert resumed.report["losses"] == pytest.approx(whole.report["losses"][2:], rel=1e-5)
    assert recorder_plugin.RUNS[-1].calls[:3] == ["initialize", "train_start:4", "batch_start:2"]
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(expected[n], initial[n]) for n in initial if n in expected)
    assert not (tmp_path / ".resumed.train").exists()
