"""What the methods are for: AWQ's layer outputs beat plain rounding at 4 and 3 bits, and
SmoothQuant rescues W8A8 from activation outliers. Errors are measured against the float model
on the calibration text, by hooks, not by the modifiers' own numbers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers

from llmc import oneshot
from llmc.evaluate import heldout_token_ids
from llmc.testing import build_causal_lm

EMBEDDED = Path(__file__).resolve().parents[3] / "src" / "llmc" / "assets" / "tiny-llama"
CALIBRATION = {"dataset": "llmc:stdlib-docs", "num_calibration_samples": 8, "max_seq_length": 128}


def _groups(bits: int) -> str:
    return (
        "        config_groups:\n          group_0:\n            targets: [Linear]\n"
        f"            weights: {{num_bits: {bits}, type: int, symmetric: false, strategy: group, group_size: 128}}\n"
    )


def _recipe(bits: int, awq: bool) -> str:
    head = "quant_stage:\n  quant_modifiers:\n" + ("    AWQModifier: {n_grid: 10}\n" if awq else "")
    return head + "    QuantizationModifier:\n        ignore: [lm_head]\n" + _groups(bits)


def _layer_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).double().square().sum() / want.double().square().sum())


@pytest.fixture(scope="module")
def embedded():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(EMBEDDED), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))
    ids = heldout_token_ids(tokenizer)[:1024].reshape(2, 512)  # text the calibration never saw
    return model, {"input_ids": ids}


@pytest.mark.parametrize("bits", [4, 3], ids=["W4", "W3"])
def test_awq_layer_outputs_beat_round_to_nearest(embedded, bits):
    model, batch = embedded
    reference = _layer_outputs(model, batch)
    errors = {}
    for awq in (False, True):
        result = oneshot(model=copy.deepcopy(model), recipe=_recipe(bits, awq), **CALIBRATION)
        errors[awq] = [_relative(y, r) for y, r in zip(_layer_outputs(result.model, batch), reference)]
    assert errors[True][0] < errors[False][0]  # the first layer: same inputs for both
    assert sum(errors[True]) < sum(errors[False]), errors


def test_smoothquant_rescues_w8a8_from_activation_outliers(tokenizer):
    model = build_causal_lm("llama", hidden=128, layers=2)
    with torch.no_grad():  # a few channels 40x larger in every norm's output, as in real LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 40.0
            layer.post_attention_layernorm.weight[:3] *= 40.0
    ids = torch.randint(4, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = model(**batch).logits
    from datasets import Dataset

    calibration = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    errors = {}
    for smooth in (False, True):
        recipe = "quant_stage:\n  quant_modifiers:\n"
        if smooth:
            recipe += "    SmoothQuantModifier: {smoothing_strength: 0.5}\n"
        recipe += "    QuantizationModifier: {scheme: W8A8, ignore: [lm_head]}\n"
        result = oneshot(model=copy.deepcopy(model), tokenizer=tokenizer, recipe=recipe, dataset=calibration)
        with torch.no_grad():
            errors[smooth] = _relative(result.model(**batch).logits, reference)
    assert errors[True] < 0.5 * errors[False], errors
