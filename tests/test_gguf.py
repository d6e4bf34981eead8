"""A ``.gguf`` file (llama.cpp's format) as the model: read through transformers' GGUF loader.

The files are written here from the tiny Llama with the ``gguf`` package, as llama.cpp's
converter lays them out (q/k rows interleaved per head, a "gpt2" tokenizer), so the loading a
user's GGUF model goes through is tested without a download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmc import oneshot, train
from llmc.args import ModelArguments
from llmc.errors import ArgumentError, ModelLoadError
from llmc.models import (
    _load_error,
    gguf_loaded_bytes,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from llmc.testing import GPTQ_W4_GROUP16, sample_logits, save_tiny_gguf


@pytest.fixture(scope="module")
def gguf_path(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf")


def test_a_gguf_file_loads_as_the_model_and_tokenizer_it_was_written_from(gguf_path, tiny_model_dir, tmp_path):
    args = ModelArguments(model=str(gguf_path), device="cpu")
    model, tokenizer = load_model(args), load_tokenizer(args)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Split the string at the first occurrence of the separator."
    assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    assert torch.equal(sample_logits(model, tokenizer), sample_logits(reference, reference_tokenizer))
    # dequantized, it is the dense model it now is: no GGUF marker to refuse saving or training
    assert getattr(model.config, "quantization_config", None) is None
    assert model.hf_quantizer is None and not model.is_quantized
    model.save_pretrained(tmp_path / "dense")
    bfloat16_args = ModelArguments(model=str(gguf_path), device="cpu", precision="bfloat16")
    bfloat16 = load_model(bfloat16_args)
    assert {p.dtype for p in bfloat16.parameters()} == {torch.bfloat16}
    # what offload='auto' weighs: the loaded model's bytes, not the file's
    assert gguf_loaded_bytes(args) == sum(p.numel() * 4 for p in model.parameters())
    assert gguf_loaded_bytes(bfloat16_args) == sum(p.numel() * 2 for p in model.parameters())
    assert gguf_loaded_bytes(ModelArguments(model=str(tiny_model_dir))) is None


def test_oneshot_compresses_a_gguf_model_into_a_checkpoint_transformers_loads(gguf_path, tmp_path):
    out = tmp_path / "out"
    result = oneshot(
        model=str(gguf_path), recipe=GPTQ_W4_GROUP16, dataset="llmc:stdlib-docs",
        num_calibration_samples=4, max_seq_length=32, output_dir=str(out),
    )
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert loaded.config.quantization_config.quant_method == "compressed-tensors"
    assert torch.allclose(sample_logits(loaded, tokenizer), sample_logits(result.model, tokenizer), atol=1e-4)


def test_a_gguf_model_is_not_streamed_from_disk(gguf_path, tmp_path):
    with pytest.raises(ArgumentError) as raised:
        oneshot(
            model=str(gguf_path), recipe=GPTQ_W4_GROUP16, dataset="llmc:stdlib-docs",
            num_calibration_samples=4, max_seq_length=32, output_dir=str(tmp_path / "out"), offload="disk",
        )
    assert "\n" not in str(raised.value)
    assert "not an object, a hub name or a GGUF file" in str(raised.value)


def test_other_files_are_refused_and_a_missing_gguf_package_is_named(tmp_path):
    text = tmp_path / "model.bin"
    text.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"is a file; pass the folder that holds config.json \(or a \.gguf file\)$"):
        resolve_model_path(str(text))
    error = _load_error("model", "x.gguf", {"gguf_file": "x.gguf"}, ImportError("no module named gguf"))
    assert str(error) == "reading the GGUF file 'x.gguf' needs the gguf package: pip install gguf (or llmc-core[gguf])"


def test_train_fine_tunes_a_gguf_model_and_saves_it(gguf_path, text_file, tmp_path):
    """transformers refuses to train or save a model it marked as GGUF-quantized; ours is dense."""
    result = train(
        model=str(gguf_path), dataset=str(text_file), max_seq_length=24, max_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-3, output_dir=str(tmp_path / "ft"),
    )
    assert len(result.report["losses"]) == 2
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert getattr(saved.config, "quantization_config", None) is None
