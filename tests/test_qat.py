"""Quantization-aware training: QuantizationModifier in a training stage."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmc import oneshot, train
from llmc.quantization import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    fake_quantize,
    fake_quantized_weight,
    in_qat,
    quantize_linear_,
    quantized_linears,
    start_qat_,
    stop_qat_,
    weight_codes,
)
from llmc.testing import sample_logits

SCHEMES = {
    "w4-channel": QuantizationScheme(weights=QuantizationArgs(num_bits=4, strategy="channel")),
    "w4-group32-asym": QuantizationScheme(
        weights=QuantizationArgs(num_bits=4, strategy="group", group_size=32, symmetric=False)
    ),
    "w8a8": PRESET_SCHEMES["W8A8"],
}


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_qat_forward_uses_fake_quantized_weight_and_passes_gradient_straight_through(scheme):
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    start_qat_(module, scheme)
    assert in_qat(module)
    out = module(x)
    out.pow(2).sum().backward()

    reference = torch.nn.Linear(64, 48)
    with torch.no_grad():
        reference.weight.copy_(module.weight)
        reference.bias.copy_(module.bias)
    quantize_linear_(reference, scheme)  # what the saved checkpoint computes
    reference.weight.requires_grad_(True)
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    expected.pow(2).sum().backward()
    # straight through: the float weight gets the gradient the quantized weight would get
    torch.testing.assert_close(module.weight.grad, reference.weight.grad)
    assert module.weight.grad.abs().sum() > 0

    stop_qat_(module)
    assert not in_qat(module)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, module.weight, module.bias))


def test_qat_weight_is_rounded_like_quantize_linear():
    torch.manual_seed(1)
    module = torch.nn.Linear(128, 32)
    scheme = PRESET_SCHEMES["W4A16"]
    rounded = fake_quantized_weight(module.weight.detach(), scheme)
    quantize_linear_(module, scheme)
    assert torch.equal(rounded, module.weight.detach())


def test_qat_train_stage_saves_the_quantized_trained_weights(tiny_model_dir, text_file, tmp_path):
    recipe = "qat_stage:\n  qat_modifiers:\n    QuantizationModifier: {scheme: W4A16, ignore: [lm_head]}\n"
    result = train(
        model=str(tiny_model_dir), recipe=recipe, dataset=str(text_file), max_seq_length=24,
        max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, output_dir=str(tmp_path / "qat"),
    )
    assert result.report["train_steps"] == 3  # a training stage: the modifier supports training
    assert result.report["summary"]["QuantizationModifier"]["modules"] == 14
    rtn = {name: weight_codes(m) for name, m in quantized_linears(oneshot(model=str(tiny_model_dir), recipe=recipe).model)}
    trained = dict(quantized_linears(result.model))
    assert trained.keys() == rtn.keys()
    changed = 0
    for name, module in trained.items():
        assert not in_qat(module)
        weight = module.weight.detach()
        scale, zero_point = module.weight_scale, module.weight_zero_point
        assert torch.equal(fake_quantize(weight, scale, zero_point, module.quantization_scheme.weights), weight), name
        changed += not torch.equal(weight_codes(module), rtn[name])
    assert changed > 0  # the codes are those of the trained weights, not of the original ones

    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    assert loaded.config.quantization_config.quantization_config.format == "pack-quantized"
    torch.testing.assert_close(
        sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer), rtol=0, atol=1e-4
    )
