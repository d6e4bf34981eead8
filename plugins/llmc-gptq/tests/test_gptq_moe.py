"""GPTQ on mixture-of-experts models: every expert gets a Hessian (all-experts calibration), an
expert no token reaches is rounded to nearest, and the checkpoint loads with the same logits."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import pytest
import torch
import transformers
from safetensors import safe_open

import llmc.distributed as distributed
from llmc import oneshot
from llmc.targets import is_router
from llmc.testing import (
    GPTQ_W4_GROUP16,
    build_moe_lm,
    compress_moe_logging_batches,
    never_route_to,
    sample_logits,
    save_tiny_model,
)

pytest.importorskip("compressed_tensors")

EXPERTS = 8


def _expert_rows(report: dict) -> dict[tuple[str, int], list[dict]]:
    """The report rows of expert modules, by (MoE block, expert)."""
    rows = defaultdict(list)
    for row in report["modules"]:
        block, found, rest = row["module"].partition(".experts.")
        if found:
            rows[(block, int(rest.partition(".")[0]))].append(row)
    return rows


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_gptq_calibrates_every_expert_and_the_checkpoint_loads_with_the_same_logits(
    kind, tmp_path, tokenizer, text_file
):
    model_dir = save_tiny_model(tmp_path / kind, tokenizer, kind=kind)
    result = oneshot(
        model=str(model_dir), recipe=GPTQ_W4_GROUP16, dataset=str(text_file), num_calibration_samples=8,
        batch_size=4, output_dir=str(tmp_path / "out"),
    )
    rows = _expert_rows(result.report)
    moe_layers = 1 if kind == "deepseek_v3" else 2  # DeepSeek-V3's first layer is dense
    assert len(rows) == moe_layers * EXPERTS and all(len(module_rows) == 3 for module_rows in rows.values())
    routed = defaultdict(int)
    tokens = defaultdict(set)
    for (block, _), module_rows in rows.items():
        assert all(row["tokens"] > 0 and "method" not in row for row in module_rows)  # a Hessian each
        tokens[block] |= {row["tokens"] for row in module_rows}
        routed[block] += module_rows[0]["routed_tokens"]
    # real tokens per layer, from its attention's first projection (q_proj, or MLA's q_a_proj)
    attention = {}
    for row in result.report["modules"]:
        layer, found, _ = row["module"].partition(".self_attn.")
        if found:
            attention.setdefault(layer, row["tokens"])
    for block in routed:  # model.layers.N.mlp
        real = attention[block.rpartition(".")[0]]
        assert tokens[block] == {real}  # each expert saw every real token (padding left out) ...
        assert routed[block] == 2 * real  # ... and two experts were routed each
    # the report's per-expert table and its heatmap agree with the rows
    per_block = result.report["routed_tokens"]
    assert {block.removesuffix(".experts") for block in per_block} == set(routed)
    assert all(sum(counts) == routed[block.removesuffix(".experts")] for block, counts in per_block.items())
    starved = result.report["experts_without_routed_tokens"]
    assert starved == {b: [e for e, n in enumerate(c) if n == 0] for b, c in per_block.items() if 0 in c}
    assert (result.output_dir / "llmc_experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(result.output_dir / "model.safetensors", "pt") as checkpoint:
        scales = [checkpoint.get_tensor(key) for key in checkpoint.keys() if key.endswith("weight_scale")]
        quantized = sum(
            math.prod(checkpoint.get_tensor(key).tolist()) for key in checkpoint.keys() if key.endswith("weight_shape")
        )
    assert all(torch.isfinite(scale).all() for scale in scales)
    expected = sum(  # every decoder Linear but the routers (Qwen2-MoE's shared_expert_gate)
        module.weight.numel() for name, module in result.model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_router(module)
    )
    assert quantized == expected  # every decoder Linear, experts included
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ours = sample_logits(result.model, result.tokenizer)
    torch.testing.assert_close(sample_logits(loaded, result.tokenizer), ours, rtol=1e-5, atol=1e-5)


def test_routed_calibration_rounds_an_expert_no_token_reaches(tokenizer, text_file, caplog):
    model = build_moe_lm("qwen3_moe")  # a model object, unfused by oneshot as a path would be
    never_route_to(model, 7)
    with caplog.at_level(logging.WARNING, logger="llmc.gptq"):
        result = oneshot(
            model=model, tokenizer=tokenizer, recipe=GPTQ_W4_GROUP16, dataset=str(text_file),
            num_calibration_samples=4, moe_calibrate_all_experts=False,
        )
    rows = _expert_rows(result.report)
    for (_, expert), module_rows in rows.items():
        if expert == 7:
            assert all(row["method"] == "round-to-nearest" and row["routed_tokens"] == 0 for row in module_rows)
        else:  # calibrated on the tokens routed to it (no padding with batch_size 1)
            assert all(row["tokens"] == row["routed_tokens"] > 0 for row in module_rows)
    assert "model.layers.1.mlp.experts.7.down_proj received no calibration tokens" in caplog.text
    weights = [module.weight_scale for module in result.model.modules() if hasattr(module, "weight_scale")]
    assert all(torch.isfinite(scale).all() for scale in weights)


GPTQ_W4_GROUP16_ACTORDER = GPTQ_W4_GROUP16.replace("group_size: 16}", "group_size: 16, actorder: weight}")


@pytest.mark.parametrize("recipe", [GPTQ_W4_GROUP16, GPTQ_W4_GROUP16_ACTORDER], ids=["group16", "group16-actorder"])
@pytest.mark.parametrize("all_experts", [True, False], ids=["all-experts", "routed"])
def test_batched_expert_solves_equal_one_by_one_solves_bit_for_bit(
    tokenizer, text_file, monkeypatch, recipe, all_experts
):
    """The experts of a block solved as batches give the checkpoint and report of one solve per
    expert, to the bit (on CPU every batched call runs each matrix's own routine); routed,
    expert 7 gets no token and is rounded to nearest in both."""
    batched, batched_rows, batches = compress_moe_logging_batches(tokenizer, str(text_file), recipe, all_experts)
    monkeypatch.setattr(distributed, "BATCH_COST", 0.0)  # every group a batch of its own
    alone, alone_rows, no_batches = compress_moe_logging_batches(tokenizer, str(text_file), recipe, all_experts)
    # down_proj: 8 experts (7 reached when routed) in one batch per layer; routed, gate/up too
    reached = 8 if all_experts else 7
    assert len(batches) == (2 if all_experts else 4) and not no_batches
    assert all(message.count(",") == reached - 1 for message in batches), batches
    assert batched.keys() == alone.keys()
    for key, value in batched.items():
        assert torch.equal(value, alone[key]), key
    assert batched_rows == alone_rows
    down = [row for name, row in batched_rows.items() if name.endswith("down_proj") and "tokens" in row]
    assert len({row["output_error"] for row in down}) == len(down)  # each expert its own Hessian
    if not all_experts:  # ... from its own tokens
        assert len({row["tokens"] for row in down}) > 3
    for name, row in batched_rows.items():
        if ".experts.7." in name and not all_experts:
            assert row["method"] == "round-to-nearest"
        elif ".experts." in name:
            assert row["tokens"] > 0 and "method" not in row
