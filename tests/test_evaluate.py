"""Perplexity on held-out text, and loading checkpoints (ours included) for evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch

from llmc.errors import ArgumentError, DataError, ModelLoadError
from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

HELDOUT = (
    Path(__file__).resolve().parents[1]
    / "src"
    / "llmc"
    / "assets"
    / "stdlib_docs"
    / "heldout.jsonl.gz"
)
DOCS = [
    "Return the number of items in a container.",
    "Split the string at the first occurrence of the separator.",
    "Compute the greatest common divisor of the integers.",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP's spinning
    threads made the fitting test 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    from llmc.testing import build_causal_lm

    return build_causal_lm("llama", hidden=64)


# --------------------------------------------------------------------------- held-out tokens


def test_heldout_token_ids_joins_documents_with_eos(tokenizer) -> None:
    ids = heldout_token_ids(tokenizer, datasets.Dataset.from_dict({"text": DOCS + [""]}))
    expected: list[int] = []
    for index, doc in enumerate(DOCS):
        expected += ([tokenizer.eos_token_id] if index else []) + tokenizer(doc)["input_ids"]
    assert ids.dtype == torch.long and ids.tolist() == expected


def test_heldout_token_ids_takes_the_first_documents_and_other_columns(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"body": DOCS})
    ids = heldout_token_ids(tokenizer, dataset, text_column="body", max_documents=1)
    assert ids.tolist() == tokenizer(DOCS[0])["input_ids"]


def test_heldout_token_ids_missing_column_names_the_columns(tokenizer) -> None:
    with pytest.raises(
        DataError, match=r"column 'text' not found in the evaluation data \(columns: body\)"
    ):
        heldout_token_ids(tokenizer, datasets.Dataset.from_dict({"body": DOCS}))


def test_heldout_token_ids_reads_a_local_file(tokenizer, text_file: Path) -> None:
    assert heldout_token_ids(tokenizer, str(text_file), max_documents=2).numel() > 4


def test_heldout_token_ids_of_a_hub_name_offline_is_one_line(tokenizer) -> None:
    with pytest.raises(
        DataError, match=r"^cannot load dataset 'wikitext' from the Hugging Face hub"
    ):
        heldout_token_ids(tokenizer, "wikitext")


@pytest.mark.skipif(not HELDOUT.exists(), reason="embedded corpus not built yet")
def test_heldout_token_ids_defaults_to_the_embedded_heldout_split(tokenizer) -> None:
    ids = heldout_token_ids(tokenizer, max_documents=20)
    assert ids.numel() > 100
    assert (ids == tokenizer.eos_token_id).sum().item() == 19


# --------------------------------------------------------------------------- perplexity


def test_perplexity_of_one_chunk_equals_exp_of_the_model_loss(model) -> None:
    ids = torch.randint(4, 320, (32,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert perplexity(model, ids, seq_len=32) == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_averages_over_all_predicted_tokens_of_all_chunks(model) -> None:
    ids = torch.randint(4, 320, (75,), generator=torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    with torch.no_grad():
        for start, length in [(0, 32), (32, 32), (64, 11)]:
            chunk = ids[start : start + length][None]
            total += model(chunk, labels=chunk).loss.item() * (length - 1)
            count += length - 1
    expected = math.exp(total / count)
    assert perplexity(model, ids, seq_len=32, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, seq_len=32, batch_size=1) == pytest.approx(expected, rel=1e-5)
    first_two = perplexity(model, ids, seq_len=32, max_chunks=2)
    assert first_two != pytest.approx(expected, rel=1e-6)


def test_perplexity_is_lower_after_fitting_the_text(model, tokenizer) -> None:
    ids = heldout_token_ids(tokenizer, datasets.Dataset.from_dict({"text": DOCS * 2}))
    before = perplexity(model, ids, seq_len=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    chunk = ids[: 32 * (ids.numel() // 32)].reshape(-1, 32)
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        model(chunk, labels=chunk).loss.backward()
        optimizer.step()
    model.eval()
    after = perplexity(model, ids, seq_len=32)
    assert after < before / 2


def test_perplexity_keeps_the_model_mode_and_device(model) -> None:
    model.train()
    perplexity(model, torch.arange(4, 40), seq_len=16, device="cpu")
    assert model.training
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 1}, r"'seq_len' must be at least 2"),
        ({"batch_size": 0}, r"'batch_size' must be a positive integer \(got 0\)"),
        ({"max_chunks": 0}, r"'max_chunks' must be a positive integer"),
    ],
    ids=["seq-len", "batch-size", "max-chunks"],
)
def test_perplexity_refuses_bad_arguments(model, kwargs, message) -> None:
    with pytest.raises(ArgumentError, match=message):
        perplexity(model, torch.arange(10), **kwargs)


def test_perplexity_needs_two_tokens(model) -> None:
    with pytest.raises(DataError, match=r"perplexity needs at least 2 tokens \(got 1\)"):
        perplexity(model, torch.tensor([5]))


# --------------------------------------------------------------------------- loading for eval


def test_load_model_for_eval_loads_model_and_tokenizer(tiny_model_dir: Path, tokenizer) -> None:
    model, loaded_tokenizer = load_model_for_eval(
        str(tiny_model_dir), precision="bfloat16", device="cpu"
    )
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = heldout_token_ids(loaded_tokenizer, datasets.Dataset.from_dict({"text": DOCS}))
    assert math.isfinite(perplexity(model, ids, seq_len=16))


def test_load_model_for_eval_errors_are_one_line() -> None:
    with pytest.raises(ModelLoadError, match=r"^model path './nowhere' does not exist$"):
        load_model_for_eval("./nowhere")
    with pytest.raises(
        ModelLoadError, match=r"^cannot load model 'org/name' from the Hugging Face hub"
    ):
        load_model_for_eval("org/name")


def test_load_model_for_eval_reads_a_compressed_tensors_checkpoint(
    tmp_path: Path, tokenizer
) -> None:
    """A checkpoint written by the compressed-tensors library itself loads and dequantizes."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    from llmc.testing import build_causal_lm

    model = build_causal_lm("llama", hidden=64)
    ids = torch.randint(4, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
    )
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            scale = module.weight.detach().abs().amax(dim=1, keepdim=True) / 127
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(str(tmp_path))
    tokenizer.save_pretrained(tmp_path)

    loaded, _ = load_model_for_eval(str(tmp_path), precision="float32", device="cpu")
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.allclose(logits, reference, atol=0.05)
    assert not torch.equal(logits, reference)
