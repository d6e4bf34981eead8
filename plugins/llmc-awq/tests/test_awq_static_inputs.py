"""AWQ before a quantizer with static input scales: the scales are observed on the smoothed layer.

AWQ folds its scales into the layer in ``llmc_layer_start``, before the quantizer's observers
are attached, so the calibration pass shows them the inputs the smoothed layer really receives.
Layer 0's q/k/v read the smoothed input norm of the embeddings, which the final model computes
again: plain hooks on it are the oracle; transformers' loader is the one for the round trip.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.args import DatasetArguments
from llmc.data import load_calibration_data
from llmc.testing import sample_logits

SAMPLES = {"dataset": "llmc:stdlib-docs", "num_calibration_samples": 8, "max_seq_length": 64}
RECIPE = """
quant_stage:
  quant_modifiers:
    AWQModifier: {}
    QuantizationModifier:
      scheme: FP8
      ignore: [lm_head]
"""


def test_awq_then_fp8_static_scales_see_the_smoothed_inputs(tmp_path):
    result = oneshot(model="llmc:tiny-llama", recipe=RECIPE, output_dir=str(tmp_path / "out"), **SAMPLES)
    q_proj = result.model.model.layers[0].self_attn.q_proj
    absmax = [0.0]
    handle = q_proj.register_forward_pre_hook(
        lambda m, args: absmax.__setitem__(0, max(absmax[0], float(args[0].abs().max()))), prepend=True
    )  # before the input quantizer
    with torch.no_grad():
        for sample in load_calibration_data(DatasetArguments(**SAMPLES), result.tokenizer):
            result.model(input_ids=sample.reshape(1, -1), use_cache=False)
    handle.remove()
    assert torch.equal(q_proj.input_scale, torch.tensor([absmax[0]]) / 448.0)
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer))
