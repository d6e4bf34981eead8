"""oneshot end to end: the checkpoint it writes loads in transformers and computes the same."""

from __future__ import annotations

import json

import pytest
import torch

from llmc import oneshot
from llmc.errors import CalibrationError, SaveError
from llmc.testing import build_causal_lm, sample_logits

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("recipe", ["w4a16", "w4a16_asym", "w8a16", "w8a8", "fp8_dynamic"])
def test_oneshot_checkpoint_loads_in_transformers_with_same_logits(tiny_model_dir, tmp_path, recipe):
    import transformers

    from llmc.evaluate import load_model_for_eval

    result = oneshot(model=str(tiny_model_dir), recipe=f"llmc:{recipe}", output_dir=str(tmp_path / recipe))
    # through llmc's loader, which works around the asymmetric zero-point bug of transformers 5.x
    loaded, _ = load_model_for_eval(str(result.output_dir), precision="float32")
    ours = sample_logits(result.model, result.tokenizer)
    theirs = sample_logits(loaded, result.tokenizer)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    original = sample_logits(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.tokenizer)
    assert (original - ours).abs().max() > 1e-3  # the model really was quantized
    files = {path.name for path in result.output_dir.iterdir()}
    assert {"config.json", "recipe.yaml", "llmc_report.json", "tokenizer.json"} <= files
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "lm_head" in config["quantization_config"]["ignore"]
    report = json.loads((result.output_dir / "llmc_report.json").read_text())
    assert len(report["modules"]) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def test_oneshot_group_size_must_divide_input_width(tmp_path, tokenizer):
    model = build_causal_lm("llama", hidden=192)  # 192 is not a multiple of the group size 128
    with pytest.raises(CalibrationError, match=r"group size 128 does not divide the input width 192 of model.layers.0.self_attn.q_proj"):
        oneshot(model=model, tokenizer=tokenizer, recipe="llmc:w4a16")
    result = oneshot(
        model=model, tokenizer=tokenizer, recipe="llmc:w4a16",
        recipe_args={"skip_incompatible": True},
        output_dir=str(tmp_path / "out"),
    )
    names = [row["module"] for row in result.report["modules"]]
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # in: 384
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["quantization_config"]["ignore"]


def test_oneshot_refuses_non_empty_output_dir_before_loading(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SaveError, match=r"is not empty; pass overwrite=True"):
        oneshot(model=str(tmp_path / "no-model-here"), recipe="llmc:w4a16", output_dir=str(out))
    assert (out / "keep.txt").read_text() == "precious"
    result = oneshot(model=str(tiny_model_dir), recipe="llmc:w4a16", output_dir=str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (result.output_dir / "config.json").exists()


def test_oneshot_dense_checkpoint_when_not_compressed(tiny_model_dir, tmp_path):
    import transformers

    result = oneshot(model=str(tiny_model_dir), recipe="llmc:w4a16", save_compressed=False,
                     output_dir=str(tmp_path / "dense"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(sample_logits(loaded, result.tokenizer), sample_logits(result.model, result.tokenizer),
                               rtol=1e-4, atol=1e-4)
