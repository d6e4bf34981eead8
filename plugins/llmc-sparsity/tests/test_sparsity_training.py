"""Pruning during fine-tuning: the training hooks driven by a plain torch loop (AdamW with weight
decay and momentum, which move zero-gradient weights), and once through ``llmc.train``."""

from __future__ import annotations

import pytest
import torch

from llmc.context import RunContext
from llmc.masks import sparsity_mask
from llmc.pipeline import make_lifecycle
from llmc.testing import build_causal_lm
from llmc_sparsity import ConstantPruningModifier, MagnitudePruningModifier
from llmc_sparsity.masks_nm import pruned_count
from llmc_sparsity.schedule import cubic_sparsity

VOCAB = 320


def _batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(4, VOCAB, (4, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }


def _train(model, optimizer, steps, *, lifecycle=None, context=None, first_step=0, on_step=None):
    """A plain fine-tuning loop calling the training hooks where ``llmc.train`` calls them."""
    hook = lifecycle.hook if lifecycle is not None else None
    model.train()
    for step in range(first_step, first_step + steps):
        if hook:
            context.step = step
            hook.llmc_train_batch_start(context=context, step=step)
        batch = _batch(step)
        outputs = model(**batch, labels=batch["input_ids"])
        loss = outputs.loss
        if hook:
            for term in hook.llmc_train_loss(context=context, step=step, batch=batch, outputs=outputs, loss=loss):
                loss = loss + term
        loss.backward()
        if hook:
            hook.llmc_train_after_backward(context=context, step=step)
        if on_step is not None:
            on_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hook:
            hook.llmc_train_optimizer_step_end(context=context, step=step)
    model.eval()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _warm_up_and_prune(seed: int = 0):
    """A model trained a few steps (AdamW moments non-zero), then 40 % of each Linear zeroed."""
    model = build_causal_lm(hidden=64, layers=1, vocab=VOCAB, seed=seed)
    optimizer = _optimizer(model)
    _train(model, optimizer, 3)
    generator = torch.Generator().manual_seed(seed)
    zeros = {}
    with torch.no_grad():
        for name, module in _linears(model).items():
            zero = torch.rand(module.weight.shape, generator=generator) < 0.4
            module.weight[zero] = 0.0
            zeros[name] = zero
    return model, optimizer, zeros


def test_sparsity_constant_pruning_keeps_zeros_through_optimizer_steps():
    # control: without the modifier, AdamW's moments and weight decay move the zeros
    model, optimizer, zeros = _warm_up_and_prune()
    _train(model, optimizer, 3, first_step=3)
    moved = sum(int((module.weight.detach()[zeros[name]] != 0).sum()) for name, module in _linears(model).items())
    assert moved > 0

    model, optimizer, zeros = _warm_up_and_prune()
    before = {name: module.weight.detach().clone() for name, module in _linears(model).items()}
    context = RunContext(model=model, device=torch.device("cpu"), steps_per_epoch=4, total_steps=5)
    run = ConstantPruningModifier().start(context)
    lifecycle = make_lifecycle([run])
    lifecycle.hook.llmc_initialize(context=context)
    lifecycle.hook.llmc_train_start(context=context, optimizer=optimizer)
    gradients_checked = []

    def check_gradients(step):
        for name, module in _linears(model).items():
            assert torch.all(module.weight.grad[zeros[name]] == 0)
        gradients_checked.append(step)

    _train(model, optimizer, 5, lifecycle=lifecycle, context=context, first_step=3, on_step=check_gradients)
    lifecycle.hook.llmc_train_end(context=context)
    lifecycle.hook.llmc_finalize(context=context)
    assert gradients_checked == [3, 4, 5, 6, 7]
    for name, module in _linears(model).items():
        weight = module.weight.detach()
        assert torch.all(weight[zeros[name]] == 0), name
        assert not torch.equal(weight, before[name])  # the other weights did train
        assert torch.equal(sparsity_mask(module), ~zeros[name])
    rows = [row for row in context.report if row["modifier"] == "ConstantPruningModifier" and "sparsity" in row]
    assert len(rows) == len(zeros)
    assert all(row["sparsity"] == pytest.approx(0.4, abs=0.05) for row in rows)


def test_sparsity_gradual_magnitude_follows_cubic_schedule_with_nested_masks():
    model = build_causal_lm(hidden=64, layers=1, vocab=VOCAB)
    optimizer = _optimizer(model)
    modifier = MagnitudePruningModifier(
        init_sparsity=0.2, final_sparsity=0.8, start_epoch=0.5, end_epoch=2.0, update_epochs=0.5
    )
    context = RunContext(model=model, device=torch.device("cpu"), steps_per_epoch=4, total_steps=12)
    lifecycle = make_lifecycle([modifier.start(context)])
    lifecycle.hook.llmc_initialize(context=context)
    lifecycle.hook.llmc_train_start(context=context, optimizer=optimizer)

    expected_at = {0.5: 0.2, 1.0: cubic_sparsity(1.0, 0.2, 0.8, 0.5, 2.0), 1.5: cubic_sparsity(1.5, 0.2, 0.8, 0.5, 2.0), 2.0: 0.8}
    seen: list[tuple[int, float]] = []
    previous: dict[str, torch.Tensor] = {}

    def after_backward(step):
        epoch = step / 4
        points = [point for point in expected_at if point <= epoch + 1e-9]
        target = expected_at[max(points)] if points else 0.0
        for name, module in _linears(model).items():
            kept = sparsity_mask(module)
            if kept is None:
                assert target == 0.0
                continue
            assert int((~kept).sum()) == pruned_count(kept.numel(), target), (step, name)
            if name in previous:
                assert not torch.any(kept & ~previous[name]), "a pruned weight came back"
            previous[name] = kept.clone()
            assert torch.all(module.weight.grad[~kept] == 0)
            assert torch.all(module.weight.detach()[~kept] == 0)
        seen.append((step, target))

    _train(model, optimizer, 12, lifecycle=lifecycle, context=context, on_step=after_backward)
    lifecycle.hook.llmc_train_end(context=context)
    lifecycle.hook.llmc_finalize(context=context)
    assert [target for _, target in seen] == [0.0, 0.0, 0.2, 0.2, expected_at[1.0], expected_at[1.0],
                                              expected_at[1.5], expected_at[1.5], 0.8, 0.8, 0.8, 0.8]
    for module in _linears(model).values():  # after the last optimizer step, zeros still zero
        kept = sparsity_mask(module)
        assert torch.all(module.weight.detach()[~kept] == 0)
    rows = [row for row in context.report if row["modifier"] == "MagnitudePruningModifier" and "sparsity" in row]
    assert rows and all(row["sparsity"] == pytest.approx(0.8, abs=1e-3) for row in rows)


def test_sparsity_gradual_magnitude_needs_a_schedule():
    from llmc.errors import CalibrationError

    model = build_causal_lm(hidden=64, layers=1, vocab=VOCAB)
    context = RunContext(model=model, device=torch.device("cpu"), steps_per_epoch=4, total_steps=4)
    lifecycle = make_lifecycle([MagnitudePruningModifier(final_sparsity=0.5).start(context)])
    lifecycle.hook.llmc_initialize(context=context)
    with pytest.raises(CalibrationError, match=r"needs 'end_epoch' and 'update_epochs'"):
        lifecycle.hook.llmc_train_start(context=context, optimizer=_optimizer(model))


def test_sparsity_prune_then_finetune_with_train_entrypoint(model_dir, text_file, tmp_path):
    """SparseGPT 2:4 (one-shot stage), then fine-tuning with the zeros held (training stage)."""
    from llmc.entrypoints.train import train

    recipe = """
prune_stage:
  run_type: oneshot
  prune_modifiers:
    SparseGPTModifier: {mask_structure: '2:4'}
finetune_stage:
  run_type: train
  finetune_modifiers:
    ConstantPruningModifier: {}
"""
    result = train(
        model=str(model_dir), recipe=recipe, dataset=str(text_file), num_calibration_samples=8,
        max_seq_length=32, max_steps=3, learning_rate=1e-3, per_device_train_batch_size=4,
    )
    checked = 0
    for module in result.model.modules():
        kept = sparsity_mask(module)
        if kept is not None:
            assert torch.all(module.weight.detach()[~kept] == 0)
            assert torch.all(kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2)
            checked += 1
    assert checked == 14
    assert result.report["train_steps"] == 3


def test_sparsity_constant_pruning_holds_exact_sparsity_through_trainer_steps(model_dir, text_file):
    """Magnitude pruning (one-shot), then Trainer steps with AdamW, weight decay and a large
    learning rate, which would move every zero: each Linear keeps exactly its zeros."""
    from llmc import oneshot, train

    prune = "prune_stage:\n  run_type: oneshot\n  prune_modifiers:\n    MagnitudePruningModifier: {final_sparsity: 0.6}\n"
    pruned = {name: m.weight.detach().clone() for name, m in _linears(oneshot(model=str(model_dir), recipe=prune).model).items()}
    recipe = prune + "finetune_stage:\n  run_type: train\n  finetune_modifiers:\n    ConstantPruningModifier: {}\n"
    result = train(
        model=str(model_dir), recipe=recipe, dataset=str(text_file), max_seq_length=24, max_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1, warmup_steps=1,
    )
    assert result.report["train_steps"] == 4
    for name, module in _linears(result.model).items():
        weight = module.weight.detach()
        assert torch.equal(weight == 0, pruned[name] == 0), name  # the same zeros, no more, no fewer
        assert int((weight == 0).sum()) == pruned_count(weight.numel(), 0.6)
        assert not torch.equal(weight, pruned[name])  # the kept weights trained
