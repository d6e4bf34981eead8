"""Train the tiny Llama that llmc ships as its offline default model.

llmc's tests, examples and smoke runs need a real causal LM that loads with
``AutoModelForCausalLM`` without touching the Hugging Face hub. Downloaded
checkpoints are not an option, so this script trains one from scratch on the
embedded stdlib docstring corpus (see ``scripts/build_stdlib_corpus.py``),
entirely on CPU.

The script builds the tokenizer and the randomly initialised model and saves them
as a checkpoint folder; ``llmc.train`` (no recipe: plain fine-tuning on
``transformers.Trainer``) then trains that folder on exactly the chunks cut here.

Typical use (first measure, then train in the background)::

    python scripts/train_tiny_model.py --bench 3
    python scripts/train_tiny_model.py --steps 360
    python scripts/train_tiny_model.py --steps 5 --out /tmp/tiny-llama-check   # smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "src" / "llmc" / "assets" / "stdlib_docs"
OUT_DIR = REPO_ROOT / "src" / "llmc" / "assets" / "tiny-llama"

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
VOCAB_SIZE = 4096


def seed_everything(seed: int) -> None:
    """Seed every RNG the run touches so reruns have the same structure."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional here
        pass


def read_texts(path: Path) -> list[str]:
    """Read the ``text`` field of a gzip'd JSON-lines corpus file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE so any input string is encodable without ``<unk>``.

    No BOS is added automatically: the model is trained on a stream of
    documents separated by ``</s>``, so plain ``tokenizer(text)`` matches what
    it saw during training.
    """
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[int]:
    """Concatenate documents, each followed by ``</s>``, into one token list."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # verbose=False: long documents are fine here, they get chunked afterwards.
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return ids


def make_tokenizer_config_portable(folder: Path) -> None:
    """Record the tokenizer class under its transformers 4.x name.

    transformers 5 writes ``TokenizersBackend``, which 4.x cannot resolve;
    ``PreTrainedTokenizerFast`` is understood by both (5.x aliases it).
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_chunks(ids: list[int], seq_len: int) -> torch.Tensor:
    """Cut the stream into full ``seq_len`` chunks; the ragged tail is dropped."""
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """Create the fixed tiny architecture, seeded so every run starts from the same init.

    GQA (2 KV heads) and untied embeddings are kept on purpose: they exercise
    code paths in llmc that a smaller, tied toy model would not.
    """
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # A plain greedy config: no sampling knobs that would trigger validation
    # warnings, and the special ids that generate() needs to stop and pad.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@torch.no_grad()
def perplexity(
    model: LlamaForCausalLM, chunks: torch.Tensor, batch_size: int = 8
) -> tuple[float, int]:
    """Mean next-token NLL over every predicted token of every chunk, in fp32.

    Returns ``(perplexity, number_of_predicted_tokens)``.
    """
    model.eval()
    nll_sum = 0.0
    count = 0
    for batch in chunks.split(batch_size):
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
    model.train()
    return math.exp(nll_sum / count), count


def trainer_settings(args: argparse.Namespace, steps: int, bf16: bool) -> dict:
    """``llmc.train``'s arguments for the run: AdamW with betas 0.9/0.95, weight decay on
    matrices only (the Trainer skips biases and norms), linear warmup, cosine to 10 % of the
    peak, gradient accumulation to ``micro_batch`` samples per forward pass.
    """
    if args.batch_size % args.micro_batch:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    return {
        "max_steps": steps,
        "per_device_train_batch_size": args.micro_batch,
        "gradient_accumulation_steps": args.batch_size // args.micro_batch,
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": "cosine_with_min_lr",
        "warmup_steps": args.warmup,
        "max_grad_norm": args.clip,
        "bf16": bf16,
        "logging_steps": 10,
        "seed": args.seed,
        "max_seq_length": args.seq_len,
        "trainer_args": {
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "adam_epsilon": 1e-8,
            "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        },
    }


def train_with_llmc(
    init_dir: Path, chunks: torch.Tensor, args: argparse.Namespace, *, steps: int, bf16: bool,
    output_dir: Path | None,
):
    """``llmc.train`` on the saved initial model: the chunks as an ``input_ids`` dataset."""
    import llmc

    dataset = datasets.Dataset.from_dict({"input_ids": chunks.tolist()})
    return llmc.train(
        model=str(init_dir), dataset=dataset, recipe=None, precision="float32",
        output_dir=None if output_dir is None else str(output_dir), overwrite=True,
        **trainer_settings(args, steps, bf16),
    )


def bench(init_dir: Path, chunks: torch.Tensor, args: argparse.Namespace) -> None:
    """Time ``args.bench`` steps in fp32 and in bf16 autocast so the run can pick the faster.

    Each timing is one whole ``llmc.train`` call (model load and Trainer set-up included) with
    nothing saved, so short benches overstate the per-step time a little.
    """
    for bf16 in (False, True):
        started = time.perf_counter()
        result = train_with_llmc(init_dir, chunks, args, steps=args.bench, bf16=bf16, output_dir=None)
        seconds = time.perf_counter() - started
        print(
            f"{'bf16' if bf16 else 'fp32'}: {seconds / args.bench:.2f}s/step over {args.bench} steps "
            f"(loss {result.report['last_loss']:.3f})",
            flush=True,
        )


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores visible, {torch.get_num_threads()} torch threads, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


@dataclass
class RunStats:
    steps_done: int
    planned_steps: int
    tokens_seen: int
    train_seconds: float
    total_seconds: float
    heldout_ppl: float
    heldout_tokens: int
    train_ppl: float
    train_eval_tokens: int
    n_train_tokens: int
    n_train_chunks: int
    n_params: int
    use_bf16: bool
    final_loss: float
    command: str
    machine: str


def write_model_card(out_dir: Path, stats: RunStats, args: argparse.Namespace) -> None:
    import tokenizers
    import transformers

    epochs = stats.tokens_seen / max(1, stats.n_train_tokens)
    card = f"""---
license: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- tiny
- llmc
---

# tiny-llama (llmc embedded default model)

A deliberately small Llama-architecture causal LM trained from scratch on CPU so
that llmc has a real model to compress, calibrate and evaluate **without any
network access**. It is not useful as a language model beyond that: it has only
seen Python standard-library docstrings.

## Architecture

`LlamaForCausalLM`, float32 weights (`model.safetensors`).

| field | value |
|---|---|
| parameters | {stats.n_params:,} |
| vocab_size | {VOCAB_SIZE} |
| hidden_size | 256 |
| intermediate_size | 768 |
| num_hidden_layers | 4 |
| num_attention_heads | 8 |
| num_key_value_heads | 2 (GQA, head_dim 32) |
| max_position_embeddings | 1024 |
| tie_word_embeddings | false |
| rms_norm_eps | 1e-5 |

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split, vocab size
{VOCAB_SIZE}, special tokens `<s>` (bos), `</s>` (eos), `<unk>`, `<pad>` (pad),
wrapped as a `PreTrainedTokenizerFast`. No BOS token is added automatically:
during training documents were concatenated as `doc </s> doc </s> ...` and cut
into {args.seq_len}-token chunks, so plain `tokenizer(text)` matches the training
distribution.

## Data

`src/llmc/assets/stdlib_docs/train.jsonl.gz` (docstrings of the Python
standard library, split by module; see that folder's README).
{stats.n_train_tokens:,} tokens, {stats.n_train_chunks:,} chunks of {args.seq_len}
tokens. The held-out split (`heldout.jsonl.gz`) contains whole modules never seen
in training.

## Training

| field | value |
|---|---|
| trainer | `llmc.train` without a recipe (`transformers.Trainer`) |
| optimizer | AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices) |
| learning rate | {args.lr} peak, {args.warmup} warmup steps, cosine to 10% over {stats.planned_steps} planned steps |
| batch | {args.batch_size} x {args.seq_len} tokens (micro-batch {args.micro_batch}) |
| grad clip | {args.clip} |
| precision | {"bf16 autocast" if stats.use_bf16 else "fp32"} |
| steps | {stats.steps_done} |
| tokens seen | {stats.tokens_seen:,} (~{epochs:.1f} epochs) |
| final train loss | {stats.final_loss:.3f} |
| training wall time | {stats.train_seconds / 60:.1f} min (whole script {stats.total_seconds / 60:.1f} min) |
| seed | {args.seed} |
| machine | {stats.machine} |
| libraries | transformers {transformers.__version__}, tokenizers {tokenizers.__version__} |

## Evaluation

Perplexity = exp(mean next-token NLL) over all {args.seq_len}-token chunks, fp32,
same `</s>` document joining as training.

| split | tokens scored | perplexity |
|---|---|---|
| held-out (unseen modules) | {stats.heldout_tokens:,} | **{stats.heldout_ppl:.2f}** |
| train (first 64 chunks) | {stats.train_eval_tokens:,} | {stats.train_ppl:.2f} |

## Reproduce

```
{stats.command}
```

Results are reproducible in structure (same data, tokenizer, init, schedule and
data order); exact numbers vary with CPU kernels.
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument(
        "--steps", type=int, default=360, help="optimizer steps; the cosine schedule spans these"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bench", type=int, default=0, help="only time N steps in fp32 and bf16, then exit"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    train_texts = read_texts(args.corpus_dir / "train.jsonl.gz")
    heldout_texts = read_texts(args.corpus_dir / "heldout.jsonl.gz")
    tokenizer = train_tokenizer(train_texts)
    train_ids = token_stream(tokenizer, train_texts)
    train_chunks = make_chunks(train_ids, args.seq_len)
    heldout_chunks = make_chunks(token_stream(tokenizer, heldout_texts), args.seq_len)
    print(
        f"tokenizer vocab {len(tokenizer)}; train {len(train_texts)} docs -> {len(train_ids)} tokens, "
        f"{len(train_chunks)} chunks; heldout {len(heldout_chunks)} chunks",
        flush=True,
    )

    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params:,}", flush=True)

    with tempfile.TemporaryDirectory(prefix="tiny-llama-init-") as init:
        # The random initialisation as a checkpoint folder: llmc.train loads it like any model.
        init_dir = Path(init)
        model.save_pretrained(init_dir, safe_serialization=True)
        tokenizer.save_pretrained(init_dir)
        del model
        if args.bench:
            bench(init_dir, train_chunks, args)
            return
        use_bf16 = args.precision == "bf16"
        t_train = time.perf_counter()
        result = train_with_llmc(
            init_dir, train_chunks, args, steps=args.steps, bf16=use_bf16, output_dir=args.out
        )
        train_seconds = time.perf_counter() - t_train
    model = result.model
    losses = result.report["losses"]
    steps_done = len(losses)
    tokens_seen = steps_done * args.batch_size * args.seq_len
    print(
        f"trained {steps_done} steps, {tokens_seen:,} tokens in {train_seconds / 60:.1f} min "
        "(model load, training and save)",
        flush=True,
    )

    heldout_ppl, heldout_tokens = perplexity(model, heldout_chunks)
    train_ppl, train_eval_tokens = perplexity(model, train_chunks[:64])
    print(
        f"heldout ppl {heldout_ppl:.3f} over {heldout_tokens} tokens; train ppl {train_ppl:.3f}",
        flush=True,
    )
    make_tokenizer_config_portable(args.out)
    # The asset is a plain checkpoint: the model card below records the run instead of train's
    # report (which names the temporary init folder) and its empty recipe.
    for name in ("llmc_report.json", "recipe.yaml"):
        (args.out / name).unlink(missing_ok=True)

    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]
    )
    stats = RunStats(
        steps_done=steps_done,
        planned_steps=args.steps,
        tokens_seen=tokens_seen,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - t_start,
        heldout_ppl=heldout_ppl,
        heldout_tokens=heldout_tokens,
        train_ppl=train_ppl,
        train_eval_tokens=train_eval_tokens,
        n_train_tokens=len(train_ids),
        n_train_chunks=len(train_chunks),
        n_params=n_params,
        use_bf16=use_bf16,
        final_loss=losses[-1],
        command=command,
        machine=machine_description(),
    )
    write_model_card(args.out, stats, args)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
