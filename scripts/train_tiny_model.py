"""Train the tiny Llama that llmc ships as its offline default model.

llmc's tests, examples and smoke runs need a real causal LM that loads with
``AutoModelForCausalLM`` without touching the Hugging Face hub. Downloaded
checkpoints are not an option, so this script trains one from scratch on the
embedded stdlib docstring corpus (see ``scripts/build_stdlib_corpus.py``),
entirely on CPU in a bounded amount of wall time.

Typical use (first measure, then train in the background)::

    /work/venv/bin/python scripts/train_tiny_model.py --bench 3
    /work/venv/bin/python scripts/train_tiny_model.py --steps 300 --max-minutes 20
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
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
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


def lr_at(
    step: int, planned_steps: int, warmup: int, peak: float, floor_ratio: float = 0.1
) -> float:
    """Linear warmup then cosine decay to ``floor_ratio * peak`` at ``planned_steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, planned_steps - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Decay matrices only; decaying RMSNorm gains just pulls them towards zero."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    micro_batch: int,
    use_bf16: bool,
    clip: float,
) -> float:
    """One optimizer step, with gradient accumulation to bound peak memory."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    parts = batch.split(micro_batch)
    for part in parts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=part, labels=part).loss
        (loss / len(parts)).backward()
        total += loss.item() / len(parts)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return total


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


def bench(model: LlamaForCausalLM, chunks: torch.Tensor, args: argparse.Namespace) -> None:
    """Time a few steps in fp32 and in bf16 autocast so the run can pick the faster.

    The weights are restored afterwards so benchmarking does not change the run.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for use_bf16 in (False, True):
        model.load_state_dict(state)
        opt = make_optimizer(model, args.lr, args.weight_decay)
        times = []
        for i in range(args.bench + 1):
            batch = chunks[i * args.batch_size : (i + 1) * args.batch_size]
            t0 = time.perf_counter()
            loss = train_step(model, opt, batch, args.micro_batch, use_bf16, args.clip)
            times.append(time.perf_counter() - t0)
        steady = times[1:]  # first step includes one-off allocation/JIT costs
        print(
            f"{'bf16' if use_bf16 else 'fp32'}: first {times[0]:.2f}s, "
            f"then {sum(steady) / len(steady):.2f}s/step (loss {loss:.3f})",
            flush=True,
        )
    model.load_state_dict(state)


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
    last_lr: float
    stopped_by_time_cap: bool
    command: str
    machine: str


def write_model_card(out_dir: Path, stats: RunStats, args: argparse.Namespace) -> None:
    import tokenizers
    import transformers

    epochs = stats.tokens_seen / max(1, stats.n_train_tokens)
    cap_note = ""
    if stats.stopped_by_time_cap:
        cap_note = (
            f"\nTraining stopped at the {args.max_minutes:g}-minute time cap after {stats.steps_done} of "
            f"{stats.planned_steps} planned steps, so the cosine schedule did not finish "
            f"(last learning rate {stats.last_lr:.2e}); steps ran slower than planned, "
            f"typically because the machine was busy with other jobs.\n"
        )
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
| optimizer | AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices) |
| learning rate | {args.lr} peak, {args.warmup} warmup steps, cosine to 10% over {stats.planned_steps} planned steps |
| batch | {args.batch_size} x {args.seq_len} tokens (micro-batch {args.micro_batch}) |
| grad clip | {args.clip} |
| precision | {"bf16 autocast" if stats.use_bf16 else "fp32"} |
| steps done | {stats.steps_done} (planned {stats.planned_steps}, time cap {args.max_minutes} min) |
| tokens seen | {stats.tokens_seen:,} (~{epochs:.1f} epochs) |
| final train loss | {stats.final_loss:.3f} |
| training wall time | {stats.train_seconds / 60:.1f} min (whole script {stats.total_seconds / 60:.1f} min) |
| seed | {args.seed} |
| machine | {stats.machine} |
| libraries | transformers {transformers.__version__}, tokenizers {tokenizers.__version__} |
{cap_note}
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

Results are reproducible in structure (same data, tokenizer, init and schedule);
exact numbers vary with the step count reached within the time cap and with CPU
kernels.
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument(
        "--steps", type=int, default=600, help="planned steps; the cosine schedule spans these"
    )
    p.add_argument(
        "--max-minutes", type=float, default=20.0, help="stop training after this much wall time"
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
        "--eval-every",
        type=int,
        default=50,
        help="log held-out perplexity every N steps (0: never)",
    )
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
    model.train()

    if args.bench:
        bench(model, train_chunks, args)
        return

    use_bf16 = args.precision == "bf16"
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_chunks), generator=gen)
    cursor = 0
    deadline = time.perf_counter() + args.max_minutes * 60
    t_train = time.perf_counter()
    steps_done = 0
    loss = float("nan")
    lr = 0.0
    stopped_by_time_cap = False
    bar = tqdm(
        range(args.steps),
        desc="train",
        mininterval=15,
        file=sys.stdout,
        dynamic_ncols=False,
        ncols=100,
    )
    for step in bar:
        if time.perf_counter() >= deadline:
            print(f"\ntime cap reached after {step} steps", flush=True)
            stopped_by_time_cap = True
            break
        if cursor + args.batch_size > len(order):  # new epoch, fresh shuffle
            order = torch.randperm(len(train_chunks), generator=gen)
            cursor = 0
        batch = train_chunks[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        lr = lr_at(step, args.steps, args.warmup, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, batch, args.micro_batch, use_bf16, args.clip)
        steps_done = step + 1
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t_train
            print(
                f"step {step} loss {loss:.4f} lr {lr:.2e} elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and steps_done % args.eval_every == 0:
            # Monitoring only: the saved model is always the last step, so the
            # held-out split never influences training or model selection.
            ppl, _ = perplexity(model, heldout_chunks)
            print(f"step {step} heldout ppl {ppl:.2f}", flush=True)
    bar.close()
    train_seconds = time.perf_counter() - t_train
    tokens_seen = steps_done * args.batch_size * args.seq_len
    print(
        f"trained {steps_done} steps, {tokens_seen:,} tokens in {train_seconds / 60:.1f} min",
        flush=True,
    )

    heldout_ppl, heldout_tokens = perplexity(model, heldout_chunks)
    train_ppl, train_eval_tokens = perplexity(model, train_chunks[:64])
    print(
        f"heldout ppl {heldout_ppl:.3f} over {heldout_tokens} tokens; train ppl {train_ppl:.3f}",
        flush=True,
    )

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.to(torch.float32).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    make_tokenizer_config_portable(args.out)

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
        final_loss=loss,
        last_lr=lr,
        stopped_by_time_cap=stopped_by_time_cap,
        command=command,
        machine=machine_description(),
    )
    write_model_card(args.out, stats, args)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
