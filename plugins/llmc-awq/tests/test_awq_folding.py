"""Mappings found from the data flow, and scales folded so that the model computes the same function.

Each model here is smoothed by AWQ (and SmoothQuant) *without* the rounding: the AWQ run state
is driven through core's pipeline on its own, with the quantizer after it in the stage only
supplying the scheme, so the logits must stay the same to float tolerance while the weights
move.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers

from llmc import RunContext
from llmc.modifiers.quantization import QuantizationModifier
from llmc.moe import unfuse_experts_
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.testing import build_causal_lm, build_moe_lm
from llmc_awq import AWQModifier, SmoothQuantModifier

EMBEDDED = "src/llmc/assets/tiny-llama"


def _batches(vocab: int, count: int = 2, tokens: int = 24) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(4, vocab, (1, tokens), generator=generator),
         "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
        for _ in range(count)
    ]


def _phi3() -> torch.nn.Module:
    config = transformers.Phi3Config(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=3, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _gemma() -> torch.nn.Module:
    config = transformers.GemmaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        pad_token_id=3, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (a scale of 1 + w); make them informative
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
    return model


def _moe() -> torch.nn.Module:
    model = build_moe_lm("qwen3_moe")
    unfuse_experts_(model)
    return model


def _deepseek() -> torch.nn.Module:
    model = build_moe_lm("deepseek_v3")
    unfuse_experts_(model)
    return model


def _embedded() -> torch.nn.Module:
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    return transformers.AutoModelForCausalLM.from_pretrained(str(root / EMBEDDED), dtype=torch.float32).eval()


MODELS = {
    "tiny-llama": _embedded,
    "qwen3": lambda: build_causal_lm("qwen3"),
    "phi3-fused": _phi3,
    "gemma-1+w": _gemma,
    "qwen3-moe": _moe,
    "deepseek-v3-mla-moe": _deepseek,
    "mistral": lambda: build_causal_lm("mistral"),
}
GROUP16 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                          "strategy": "group", "group_size": 16}}}


def smooth_only(model: torch.nn.Module, modifier, quantizer=None) -> RunContext:
    """Run ``modifier``'s run state alone through the pipeline (nothing rounds the weights)."""
    context = RunContext(model=model, device=torch.device("cpu"))
    context.stage_modifiers = (modifier,) + ((quantizer,) if quantizer is not None else ())
    run = modifier.start(context)
    pipeline = LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([run]), show_progress=False)
    pipeline.run(_batches(model.config.vocab_size))
    context.stage_modifiers = ()
    return context


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batches(model.config.vocab_size, count=1, tokens=32)[0]).logits


@pytest.mark.parametrize("kind", list(MODELS))
def test_awq_folding_keeps_the_model_output(kind):
    model = MODELS[kind]()
    before = copy.deepcopy(model)
    context = smooth_only(model, AWQModifier(n_grid=4), QuantizationModifier(config_groups=GROUP16))
    rows = [row for row in context.report if row["modifier"] == "AWQModifier"]
    assert rows, "no mapping was smoothed"
    moved = max(
        float((a - b).detach().abs().max()) for a, b in zip(before.parameters(), model.parameters())
    )
    assert moved > 1e-3, "the scales changed no weight"
    reference = _logits(before)
    assert torch.allclose(_logits(model), reference, atol=1e-4 * float(reference.abs().max()), rtol=1e-4)


def _smooth_names(context: RunContext) -> set[str]:
    return {row["module"].split(".", 3)[-1] for row in context.report}


def test_llama_mappings_found_from_the_data_flow(caplog):
    caplog.set_level(logging.INFO, logger="llmc.awq")
    context = smooth_only(_embedded(), AWQModifier(n_grid=4), QuantizationModifier(scheme="W4A16"))
    by_smooth = {row["module"].split(".", 3)[-1]: row for row in context.report if row["module"].startswith("model.layers.1.")}
    assert set(by_smooth) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert [b.split(".", 3)[-1] for b in by_smooth["input_layernorm"]["balance"]] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
    ]
    assert by_smooth["input_layernorm"]["parent"] == "model.layers.1.self_attn"
    assert [b.split(".", 3)[-1] for b in by_smooth["mlp.up_proj"]["balance"]] == ["mlp.down_proj"]
    # o_proj reads v through grouped-query attention (8 heads, 2 kv heads): no channel-wise
    # producer, so it is left out, with the reason in the log
    assert any(
        "self_attn.o_proj: its input is neither a normalisation's output nor a channel-wise image" in r.message
        for r in caplog.records
    )


def test_fused_and_gemma_and_moe_mappings():
    phi = smooth_only(_phi3(), AWQModifier(n_grid=4), QuantizationModifier(config_groups=GROUP16))
    assert _smooth_names(phi) == {"input_layernorm", "self_attn.qkv_proj", "post_attention_layernorm", "mlp.gate_up_proj"}
    gemma = smooth_only(_gemma(), AWQModifier(n_grid=4), QuantizationModifier(config_groups=GROUP16))
    assert {"input_layernorm", "post_attention_layernorm"} <= _smooth_names(gemma)
    moe = smooth_only(_moe(), AWQModifier(n_grid=4), QuantizationModifier(config_groups=GROUP16))
    norm_row = next(r for r in moe.report if r["module"] == "model.layers.0.post_attention_layernorm")
    assert "model.layers.0.mlp.gate" in norm_row["balance"]  # the router is balanced, not rounded
    assert sum(".experts." in b for b in norm_row["balance"]) == 2 * 8  # every expert's gate and up
    experts_down = [r for r in moe.report if r["module"].endswith("up_proj") and ".experts." in r["module"]]
    assert len(experts_down) == 2 * 8  # up -> down inside each expert, both layers
    deepseek = smooth_only(_deepseek(), AWQModifier(n_grid=4), QuantizationModifier(config_groups=GROUP16))
    # multi-head latent attention: the latent norms feed the up-projections
    assert {"self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", "mlp.shared_experts.up_proj"} <= _smooth_names(deepseek)


def test_smoothquant_folding_keeps_the_model_output():
    model = _embedded()
    before = copy.deepcopy(model)
    context = smooth_only(model, SmoothQuantModifier(smoothing_strength=0.8))
    assert {row["module"].split(".", 3)[-1] for row in context.report} == {
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj"
    }
    assert all(row["activation_max_after"] < row["activation_max_before"] for row in context.report)
    reference = _logits(before)
    assert torch.allclose(_logits(model), reference, atol=1e-4 * float(reference.abs().max()), rtol=1e-4)
