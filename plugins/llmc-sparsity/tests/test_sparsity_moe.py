"""Pruning mixture-of-experts models: every expert is pruned with all-experts calibration; with
routed calibration an expert no token reaches is left dense, and the report says so."""

from __future__ import annotations

import logging

import pytest

from llmc import oneshot
from llmc.testing import build_moe_lm, never_route_to

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
