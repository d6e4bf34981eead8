"""Mixture-of-experts models: fused experts become per-expert Linears that compute the same, get
quantized, and are saved under the per-expert names transformers' loader merges from."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.core_model_loading import revert_weight_conversion

from llmc import ModelLoadError, oneshot
from llmc.moe import UnfusedExperts, experts_calibration, find_fused_experts, unfuse_experts_
from llmc.targets import is_router, match_modules
from llmc.testing import MOE_KINDS, build_causal_lm, build_moe_lm, sample_logits, save_tiny_model

pytest.importorskip("compressed_tensors")

RTN_W4_GROUP16 = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""
ROUTER_SUFFIXES = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".shared_expert_gate.weight")


def _ids() -> torch.Tensor:
    return torch.randint(4, 320, (3, 19), generator=torch.Generator().manual_seed(0))


def _routing(tokens: int, experts: int, top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, 64, generator=generator)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    return hidden, index, weights


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons of one fused [2I] product with two [I] products hold on one
    thread; with several, MKL blocks the two shapes differently (seen on 2 AVX-512 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_unfused_experts_compute_exactly_what_the_fused_ones_compute(kind, one_thread):
    fused = build_moe_lm(kind)
    model = copy.deepcopy(fused)
    names = unfuse_experts_(model)
    assert names and all(isinstance(model.get_submodule(name), UnfusedExperts) for name in names)
    assert not find_fused_experts(model)
    fused.set_experts_implementation("eager")  # the reference forward, per expert as ours
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, fused(_ids()).logits)
        hidden, index, weights = _routing(23, len(model.get_submodule(names[0])))
        ours = model.get_submodule(names[0])(hidden, index, weights)
        assert torch.equal(ours, fused.get_submodule(names[0])(hidden, index, weights))
        fused.set_experts_implementation("grouped_mm")  # what transformers runs by default
        torch.testing.assert_close(model(_ids()).logits, fused(_ids()).logits, rtol=1e-5, atol=1e-5)
    # the state dict holds exactly the per-expert names the checkpoint has (after the model's
    # own renamings, as saving applies them), and no weight was copied: every expert's gate and
    # up weights are views of the one fused tensor
    assert set(revert_weight_conversion(model, model.state_dict())) == set(
        revert_weight_conversion(fused, fused.state_dict())
    )
    experts = model.get_submodule(names[0])
    storages = {experts[e].projection(role).weight.untyped_storage().data_ptr() for e in (0, 1) for role in ("gate", "up")}
    assert len(storages) == 1


def test_mixtral_experts_take_the_checkpoint_names():
    model = build_moe_lm("mixtral", experts=4)
    unfuse_experts_(model)
    assert [name for name, _ in model.model.layers[0].mlp.experts[2].named_children()] == ["w1", "w3", "w2", "act_fn"]
    keys = revert_weight_conversion(model, model.state_dict())
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in keys


def test_calibration_mode_keeps_the_output_and_counts_routed_real_tokens():
    model = build_moe_lm("qwen3_moe")
    (name,) = unfuse_experts_(model)[:1]
    experts = model.get_submodule(name)
    hidden, index, weights = _routing(24, 8)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # three padded tokens
    with torch.no_grad():
        plain = experts(hidden, index, weights)
        with experts_calibration(experts, all_experts=False, attention_mask=lambda: mask):
            assert torch.equal(experts(hidden, index, weights), plain)
        real = index[mask.reshape(-1).bool()]
        assert experts.routed_tokens.tolist() == torch.bincount(real.reshape(-1), minlength=8).tolist()
        with experts_calibration(experts, all_experts=True, attention_mask=lambda: None):
            # every expert computes on every token; the routed rows are kept (the same values,
            # up to the rounding of a product over more rows)
            torch.testing.assert_close(experts(hidden, index, weights), plain, rtol=1e-6, atol=1e-6)
            experts(hidden, index, weights)  # a second batch adds to the pass's counts
    assert experts.routed_tokens.sum().item() == 2 * 24 * 2
    assert experts.calibration is None


def test_experts_that_cannot_be_unfused_are_refused_and_the_model_is_left_alone():
    model = build_moe_lm("qwen3_moe")
    # a layout no adapter knows: the second layer's experts claim their weights are transposed
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(
        ModelLoadError,
        match=r"^model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\) holds its experts as fused 3-D weights "
        r"that llmc cannot unfuse into Linears: its weights are stored transposed or with gate and up rows "
        r"interleaved; llmc unfuses .* a plugin can add an experts adapter \(llmc_register_experts_adapters\)$",
    ):
        unfuse_experts_(model)
    assert len(find_fused_experts(model)) == 2  # the first layer's experts were not replaced either


def test_routers_are_left_alone_by_class_targets_and_shared_experts_are_not():
    model = build_moe_lm("qwen2_moe")
    unfuse_experts_(model)
    router = "model.layers.0.mlp.shared_expert_gate"
    assert is_router(model.get_submodule(router))
    linears = {name for name, _ in match_modules(model, ["Linear"], ["lm_head"])}
    assert router not in linears
    assert {"model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.experts.7.down_proj"} <= linears
    assert {name for name, _ in match_modules(model, [router])} == {router}  # by name it is chosen
    dense = build_causal_lm("llama", hidden=64)
    assert unfuse_experts_(dense) == []
    assert not any(is_router(module) for module in dense.modules())


def _matrix_parameters(checkpoint) -> tuple[int, int]:
    """(quantized, all) parameters of the decoder layers' matrices, routers excluded."""
    quantized = total = 0
    for key in checkpoint.keys():
        if not key.startswith("model.layers.") or key.endswith(ROUTER_SUFFIXES):
            continue
        if key.endswith(".weight_shape"):
            count = math.prod(checkpoint.get_tensor(key).tolist())
            quantized += count
            total += count
        elif key.endswith(".weight") and checkpoint.get_slice(key).get_shape().__len__() == 2:
            total += math.prod(checkpoint.get_slice(key).get_shape())
    return quantized, total


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_rtn_checkpoint_has_quantized_experts_and_loads_with_the_same_logits(kind, tmp_path, tokenizer):
    model_dir = save_tiny_model(tmp_path / kind, tokenizer, kind=kind)
    result = oneshot(model=str(model_dir), recipe=RTN_W4_GROUP16, output_dir=str(tmp_path / "out"))
    with safe_open(result.output_dir / "model.safetensors", "pt") as checkpoint:
        keys = set(checkpoint.keys())
        quantized, total = _matrix_parameters(checkpoint)
        scales = [checkpoint.get_tensor(key) for key in keys if key.endswith("weight_scale")]
    assert quantized / total >= 0.99
    assert all(torch.isfinite(scale).all() for scale in scales)
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate = "w1" if kind == "mixtral" else "gate_proj"
    assert f"model.layers.1.{block}.experts.7.{gate}.weight_packed" in keys
    assert f"model.layers.1.{block}.gate.weight" in keys  # the router, as it was
    assert not [key for key in keys if ".gate.weight_" in key]
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config.pop("quantization_config")["ignore"] == ["lm_head"]
    original = json.loads((model_dir / "config.json").read_text())
    assert config == original
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ours = sample_logits(result.model, result.tokenizer)
    torch.testing.assert_close(sample_logits(loaded, result.tokenizer), ours, rtol=1e-5, atol=1e-5)
    before = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert (sample_logits(before, result.tokenizer) - ours).abs().max() > 1e-3  # really quantized
