"""Helpers for plugin authors' tests: a tiny random model, a tokenizer and seeded data.

Core's tests and both bundled plugins' tests build their models here, so a plugin's tests run
against the same kind of model core is tested with, and none of them needs a network or a
download: the tokenizer is trained on a few sentences and the weights are seeded random.

Nothing here depends on pytest; wrap the builders in fixtures of your own::

    @pytest.fixture(scope="session")
    def model_dir(tmp_path_factory):
        return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "SAMPLE_TEXT",
    "build_causal_lm",
    "build_tokenizer",
    "correlated_inputs",
    "sample_logits",
    "save_tiny_model",
    "write_text_file",
]

SAMPLE_TEXT = [
    "Return the number of items in a container.",
    "Open the file and return a stream; raise OSError upon failure.",
    "Split the string at the first occurrence of the separator.",
    "Create a new dictionary with keys from the iterable and values set to value.",
    "Return a copy of the string with leading and trailing whitespace removed.",
    "Compute the greatest common divisor of the integers given as arguments.",
    "Encode the string using the codec registered for encoding.",
    "Return True if the object is an instance of the class or of a subclass thereof.",
] * 4


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on ``SAMPLE_TEXT``, so no test downloads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )


def build_causal_lm(
    kind: str = "llama", *, hidden: int = 128, layers: int = 2, vocab: int = 320, seed: int = 0
):
    """A seeded random decoder ("llama", "mistral", "qwen2", "qwen3"), small enough for a unit test.

    The default widths are multiples of 128, so group-wise quantization and N:M masks apply to
    every Linear; pass another ``hidden`` to test a width they do not divide.
    """
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    config = configs[kind](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny_model(path: str | Path, tokenizer=None, kind: str = "llama") -> Path:
    """Save a ``build_causal_lm`` model and its tokenizer to ``path``, loadable like a checkpoint.

    Tests that pass a model by path exercise the loading code a user's run goes through.
    """
    path = Path(path)
    build_causal_lm(kind).save_pretrained(path)
    (tokenizer if tokenizer is not None else build_tokenizer()).save_pretrained(path)
    return path


def write_text_file(path: str | Path, lines: list[str] = SAMPLE_TEXT) -> Path:
    """Write ``lines`` as a jsonl file of ``{"text": ...}`` rows: a local calibration dataset."""
    path = Path(path)
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def sample_logits(model, tokenizer) -> torch.Tensor:
    """The logits of two fixed sentences, to compare a model before and after a save or load."""
    batch = tokenizer(
        ["Return the number of items.", "Split the string at the separator."],
        return_tensors="pt", padding=True,
    )
    with torch.no_grad():
        return model(**batch).logits


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``X: [tokens, cols]`` with correlated columns of unequal scale, like a layer's inputs.

    Independent unit-variance columns give a near-identity Hessian, where every calibrated
    method reduces to round-to-nearest; these inputs make the difference measurable.
    """
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5
    scales = torch.rand(cols, generator=generator) * 2 + 0.1
    mixed = torch.randn(tokens, cols, generator=generator) @ mixing
    return (mixed + 0.3 * torch.randn(tokens, cols, generator=generator)) * scales
