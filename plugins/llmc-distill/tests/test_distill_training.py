"""OutputDistillationModifier through its training hooks, and once through ``llmc.train``."""

from __future__ import annotations

import copy

import pytest
import torch

from llmc.context import RunContext
from llmc.errors import ArgumentError, ModelLoadError, RecipeError
from llmc.pipeline import make_lifecycle
from llmc.testing import build_causal_lm
from llmc_distill import OutputDistillationModifier
from llmc_distill.losses import kl_divergence

VOCAB = 320
LAYERS = r"re:model\.layers\.\d+$"


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _distill_term(modifier, student, teacher):
    """The term the loss hook returns for one student forward, with ``teacher`` as distill_teacher."""
    context = RunContext(model=student, device=torch.device("cpu"), teacher=lambda: teacher)
    lifecycle = make_lifecycle([modifier.start(context)])
    lifecycle.hook.llmc_initialize(context=context)
    lifecycle.hook.llmc_train_start(context=context, optimizer=None)
    batch = _batch()
    student.train()
    outputs = student(**batch)
    (term,) = lifecycle.hook.llmc_train_loss(context=context, step=0, batch=batch, outputs=outputs, loss=outputs.loss)
    lifecycle.hook.llmc_train_end(context=context)
    return term, outputs, context


COMPARISON_CASES = [
    pytest.param({"comparison": "kl_divergence", "temperature": 2.0}, id="kl-logits"),
    pytest.param({"comparison": "square_head", "targets": [LAYERS]}, id="square-head-layers"),
    pytest.param({"comparison": "cosine_similarity", "targets": [LAYERS]}, id="cosine-layers"),
    pytest.param({"comparison": "mse"}, id="mse-logits"),
]


@pytest.mark.parametrize("params", COMPARISON_CASES)
def test_distill_term_is_zero_when_the_student_is_the_teacher(params):
    student = build_causal_lm(hidden=64, layers=2, vocab=VOCAB)
    term, _, context = _distill_term(OutputDistillationModifier(**params), student, _frozen(student))
    assert term.item() == pytest.approx(0.0, abs=1e-5)
    (row,) = context.report
    assert row["module"] == "(teacher)" and row["teacher_parameter_bytes"] > 0
    assert row["targets"] == (["model.layers.0", "model.layers.1"] if "targets" in params else ["logits"])


@pytest.mark.parametrize("params", COMPARISON_CASES)
def test_distill_term_is_positive_after_perturbing_and_trains_the_student_only(params):
    student = build_causal_lm(hidden=64, layers=2, vocab=VOCAB)
    teacher = _frozen(student)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    term, _, _ = _distill_term(OutputDistillationModifier(**params), student, teacher)
    assert term.item() > 1e-4
    term.backward()
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_distill_scales_weigh_task_loss_and_distillation():
    student = build_causal_lm(hidden=64, layers=1, vocab=VOCAB)
    teacher = build_causal_lm(hidden=64, layers=1, vocab=VOCAB, seed=1).eval().requires_grad_(False)
    modifier = OutputDistillationModifier(orig_scale=0.25, distill_scale=3.0, temperature=2.0)
    term, outputs, _ = _distill_term(modifier, student, teacher)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in _batch().items() if k != "labels"}).logits
    distill = kl_divergence(outputs.logits, teacher_logits, temperature=2.0, mask=_batch()["attention_mask"])
    torch.testing.assert_close(outputs.loss + term, 0.25 * outputs.loss + 3.0 * distill)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({"comparison": "kl_divergance"},
                     r"'comparison' must be in \('kl_divergence', 'square_head', 'cosine_similarity', 'mse'\) "
                     r"\(got 'kl_divergance'\); did you mean 'kl_divergence'\?", id="unknown-comparison"),
        pytest.param({"temperature": 0}, r"'temperature' must be a number in \(0, ∞\) \(got 0\)", id="temperature-zero"),
        pytest.param({"temperature": -1.0}, r"'temperature' must be a number in \(0, ∞\)", id="temperature-negative"),
        pytest.param({"distill_scale": -1}, r"'distill_scale' must be a number in \[0, ∞\)", id="negative-scale"),
    ],
)
def test_distill_modifier_refuses_bad_parameters(params, expected):
    with pytest.raises(ArgumentError, match=expected):
        OutputDistillationModifier(**params)


def test_distill_recipe_reports_bad_parameter_with_its_path(model_dir):
    from llmc import train

    recipe = "finetune_stage:\n  distill_modifiers:\n    OutputDistillationModifier: {comparison: kl_divergance}\n"
    with pytest.raises(RecipeError, match=r"finetune_stage\.distill_modifiers\.OutputDistillationModifier: 'comparison' must be in .*"
                       r"did you mean 'kl_divergence'\? \(<recipe string>:3\)"):
        train(model=str(model_dir), recipe=recipe, distill_teacher="self")


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        pytest.param({}, ArgumentError,
                     r"^finetune_stage\.OutputDistillationModifier needs a teacher model: pass distill_teacher=\.\.\. "
                     r"\(a local directory, a hub name, a loaded model, or 'self'", id="no-teacher"),
        pytest.param({"distill_teacher": "self", "distill_teacher_device": "gpu0"}, ArgumentError,
                     r"^'distill_teacher_device' must be a torch device such as 'cpu', 'cuda' or 'cuda:1' \(got 'gpu0'\)$",
                     id="bad-teacher-device"),
        pytest.param({"distill_teacher": "./no/such/teacher"}, ModelLoadError,
                     r"^model path './no/such/teacher' does not exist$", id="missing-teacher-path"),
    ],
)
def test_distill_teacher_problems_are_refused_before_the_model_loads(kwargs, error, expected):
    from llmc import train

    recipe = "finetune_stage:\n  distill_modifiers:\n    OutputDistillationModifier: {}\n"
    with pytest.raises(error, match=expected):
        train(model="./no/such/model", recipe=recipe, **kwargs)


def test_distill_teacher_cannot_be_the_student_object():
    from llmc import train

    model = build_causal_lm(hidden=64, layers=1, vocab=VOCAB)
    recipe = "finetune_stage:\n  distill_modifiers:\n    OutputDistillationModifier: {}\n"
    with pytest.raises(ArgumentError, match=r"^distill_teacher is the model being trained; pass 'self'"):
        train(model=model, recipe=recipe, distill_teacher=model)
    assert all(p.requires_grad for p in model.parameters())


def test_distill_in_a_oneshot_stage_is_refused(model_dir):
    from llmc import oneshot, train

    recipe = "distill_stage:\n  distill_modifiers:\n    OutputDistillationModifier: {}\n"
    with pytest.raises(RecipeError, match=r"distill_stage\.OutputDistillationModifier only runs in a training stage \(llmc train\)"):
        oneshot(model=str(model_dir), recipe=recipe, distill_teacher="self")
    with pytest.raises(RecipeError, match=r"only runs in a training stage"):
        train(model=str(model_dir), recipe=recipe.replace("distill_stage:\n", "distill_stage:\n  run_type: oneshot\n"),
              distill_teacher="self")


def test_distill_from_self_starts_at_zero_and_moves_away(model_dir, text_file):
    from llmc import train

    recipe = "finetune_stage:\n  distill_modifiers:\n    OutputDistillationModifier: {orig_scale: 0.5}\n"
    result = train(model=str(model_dir), recipe=recipe, dataset=str(text_file), distill_teacher="self",
                   max_seq_length=24, max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4)
    (row,) = [r for r in result.report["modules"] if r["modifier"] == "OutputDistillationModifier"]
    assert row["distill_losses"][0] == pytest.approx(0.0, abs=1e-6)  # the teacher is the model as it started
    assert row["distill_losses"][-1] > 1e-4
    assert row["teacher_device"] == "cpu"
    assert row["teacher_parameter_bytes"] == sum(p.numel() * p.element_size() for p in result.model.parameters())


def test_distill_prune_then_recover_with_self_teacher_in_one_train_call(model_dir, text_file, tmp_path):
    """SparseGPT 2:4 (one-shot), then fine-tuning towards the dense model with the zeros held."""
    pytest.importorskip("llmc_sparsity")
    from llmc import train
    from llmc.masks import sparsity_mask

    recipe = """
prune_stage:
  run_type: oneshot
  prune_modifiers:
    SparseGPTModifier: {mask_structure: '2:4'}
finetune_stage:
  run_type: train
  finetune_modifiers:
    ConstantPruningModifier: {}
    OutputDistillationModifier: {comparison: square_head, targets: ['re:model\\.layers\\.\\d+$']}
"""
    output = tmp_path / "sparse-distilled"
    result = train(
        model=str(model_dir), recipe=recipe, dataset=str(text_file), distill_teacher="self",
        num_calibration_samples=8, max_seq_length=32, max_steps=3, learning_rate=1e-3,
        per_device_train_batch_size=4, output_dir=str(output),
    )
    checked = 0
    for module in result.model.modules():
        kept = sparsity_mask(module)
        if kept is not None:
            assert torch.all(module.weight.detach()[~kept] == 0)
            assert torch.all(kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2)
            checked += 1
    assert checked == 14
    (row,) = [r for r in result.report["modules"] if r["modifier"] == "OutputDistillationModifier"]
    assert row["distill_losses"][0] > 0  # the teacher is the dense model, the student pruned
    assert len(row["distill_losses"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse-distilled"]  # saved once, no scratch left
    assert (output / "model.safetensors").exists() and (output / "recipe.yaml").exists()
