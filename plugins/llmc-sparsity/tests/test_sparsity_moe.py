"""Pruning mixture-of-experts models: every expert is pruned with all-experts calibration; with
routed calibration an expert no token reaches is left dense, and the report says so."""

from __future__ import annotations

import logging

import pytest
import torch

import llmc.distributed as distributed
from llmc import oneshot
from llmc.testing import build_moe_lm, compress_moe_logging_batches, never_route_to

WANDA = "pruning_modifiers:\n  WandaPruningModifier: {sparsity: 0.5}\n"


@pytest.mark.parametrize("all_experts", [True, False], ids=["all-experts", "routed"])
def test_wanda_prunes_experts_and_leaves_an_unreached_one_dense(tokenizer, text_file, caplog, all_experts):
    model = build_moe_lm("qwen3_moe")
    never_route_to(model, 7)
    with caplog.at_level(logging.WARNING):
        result = oneshot(
            model=model, tokenizer=tokenizer, recipe=WANDA, dataset=str(text_file), num_calibration_samples=4,
            moe_calibrate_all_experts=all_experts,
        )
    experts = {row["module"]: row for row in result.report["modules"] if ".experts." in row["module"]}
    assert len(experts) == 2 * 8 * 3
    for name, row in experts.items():
        if all_experts or ".experts.7." not in name:
            assert row["sparsity"] == pytest.approx(0.5, abs=0.02), name
        else:
            assert row["sparsity"] == 0.0 and row["skipped"] == "no calibration tokens reached it"
            assert row["routed_tokens"] == 0
    unreached = "no calibration token reached model.layers.0.mlp.experts.7.gate_proj"
    assert (unreached in caplog.text) == (not all_experts)


SPARSEGPT = "pruning_modifiers:\n  SparseGPTModifier: {sparsity: 0.5}\n"
SPARSEGPT_24 = "pruning_modifiers:\n  SparseGPTModifier: {mask_structure: '2:4'}\n"


@pytest.mark.parametrize("recipe", [SPARSEGPT, SPARSEGPT_24], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("all_experts", [True, False], ids=["all-experts", "routed"])
def test_sparsegpt_batched_expert_solves_equal_one_by_one_solves_bit_for_bit(
    tokenizer, text_file, monkeypatch, recipe, all_experts
):
    """Experts pruned as batches give the weights, masks and report rows of one solve per
    expert, to the bit (CPU); routed, expert 7 gets no token and is left dense in both."""
    batched, batched_rows, batches = compress_moe_logging_batches(tokenizer, str(text_file), recipe, all_experts)
    monkeypatch.setattr(distributed, "BATCH_COST", 0.0)  # every group a batch of its own
    alone, alone_rows, no_batches = compress_moe_logging_batches(tokenizer, str(text_file), recipe, all_experts)
    reached = 8 if all_experts else 7
    assert len(batches) == (2 if all_experts else 4) and not no_batches
    assert all(message.count(",") == reached - 1 for message in batches), batches
    assert batched.keys() == alone.keys()
    for key, value in batched.items():
        assert torch.equal(value, alone[key]), key
    assert batched_rows == alone_rows
    down = [row for name, row in batched_rows.items() if name.endswith("down_proj") and "obs_loss" in row]
    assert len(down) == 2 * reached and len({row["obs_loss"] for row in down}) == len(down)
    for name, row in batched_rows.items():
        if ".experts.7." in name and not all_experts:
            assert row["sparsity"] == 0.0 and row["skipped"] == "no calibration tokens reached it"
        elif ".experts." in name:
            assert row["sparsity"] == pytest.approx(0.5, abs=0.02), name
