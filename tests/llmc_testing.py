"""Builders for tests: tiny random models and a tokenizer made here, so no test needs a network.

A module of its own (not conftest) because plugin test folders have conftest modules too, and
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import torch

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
    """A byte-level BPE tokenizer trained on a few sentences, wrapped for transformers."""
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


def build_causal_lm(kind: str = "llama", *, hidden: int = 128, layers: int = 2, vocab: int = 320):
    """A seeded random decoder of the given architecture, small enough for a unit test."""
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
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
