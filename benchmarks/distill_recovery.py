"""How much of what compression costs `llmc train` wins back, and what a training step costs.

Run with llmc's venv (needs llmc-sparsity, llmc-gptq and llmc-distill installed)::

    python benchmarks/distill_recovery.py                                  # everything
    python benchmarks/distill_recovery.py --parts sparse,dense --lrs 1e-4 --steps 100
    python benchmarks/distill_recovery.py --parts timing --timing-steps 30 --rounds 3

On the embedded tiny Llama (``llmc:tiny-llama``), in one process, every row from a fresh load:

* ``sparse``: P0 dense; P1 SparseGPT 2:4 one-shot; P2 = P1 then ``--steps`` steps of
  fine-tuning with the zeros held (``ConstantPruningModifier``); P3 = the same steps with
  ``OutputDistillationModifier`` (``kl_divergence`` on the logits) added, teacher ``"self"``
  (the dense model: the copy is taken before the recipe's SparseGPT stage). P2 and P3 run as
  one ``llmc.train`` recipe (one-shot stage, then training stage), with the same seed, data
  and hyperparameters, for every learning rate in ``--lrs``. Recovered share of the gap:
  ``(P1 − P)/(P1 − P0)``.
* ``w4a16``: RTN W4A16 and GPTQ W4A16 (one-shot) against QAT W4A16 (``QuantizationModifier``
  in a training stage, ``--steps`` steps from the dense model), per learning rate.
* ``dense``: the dense model after the same ``--steps`` steps of plain fine-tuning (no recipe),
  per learning rate: what the training alone does to perplexity. The embedded model is
  under-trained (its run stopped at a time cap), so the same steps lower the dense model's
  perplexity too, and a recovered share above 1 says more about that than about the method.
* ``timing``: seconds per optimizer step of ``llmc.train`` (recipe: ``ConstantPruningModifier``
  alone, no teacher) against a plain ``transformers.Trainer`` (transformers' own LM collator)
  on copies of the same 2:4 model, the same samples, batch, steps, optimizer and schedule,
  alternated A B A B in this process (``benchlib.inprocess``). A step's seconds are
  ``Trainer.train``'s wall time over the steps (our report's ``train_s``), so loading and
  saving are left out of both.

Data: training and calibration text is ``llmc:stdlib-docs`` cut into chunks of ``--seq-len``
tokens (``benchlib.data.corpus_chunks``, seeded order); the calibration samples are the first
``--calibration-samples`` of those chunks (``benchlib.data.calibration_chunks``). Quality is
held-out perplexity on ``llmc:stdlib-docs-heldout`` (never trained or calibrated on), fp32,
the same non-overlapping chunks of 512 for every row, on the model in memory. Results go to
``results/<name>.json`` (default ``distill-recovery``), rewritten after every row.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from typing import Any

from benchlib.data import EMBEDDED_MODEL, corpus_chunks
from benchlib.env import (
    RESULTS_DIR,
    load_average,
    machine,
    machine_line,
    names,
    parse,
    script_parser,
)
from benchlib.inprocess import alternate
from benchlib.measure import wait_until_idle
from benchlib.recipes import recipe_text
from benchlib.results import our_versions

PARTS = ("sparse", "w4a16", "dense", "timing")
EVAL_SEQ_LEN = 512

_LINEARS = "targets: [Linear], ignore: [lm_head]"
PRUNE_STAGE = (
    "prune_stage:\n  run_type: oneshot\n  prune_modifiers:\n"
    f"    SparseGPTModifier: {{sparsity: 0.5, mask_structure: '2:4', {_LINEARS}}}\n"
)
HOLD = "    ConstantPruningModifier: {" + _LINEARS + "}\n"
DISTILL = "    OutputDistillationModifier: {comparison: kl_divergence, orig_scale: 1.0, distill_scale: 1.0}\n"
FINETUNE = "finetune_stage:\n  run_type: train\n  finetune_modifiers:\n"
RECIPES = {
    "finetune-2:4": PRUNE_STAGE + FINETUNE + HOLD,
    "distill-2:4": PRUNE_STAGE + FINETUNE + HOLD + DISTILL,
    "hold-only": FINETUNE + HOLD,
    "qat-w4a16": (
        "qat_stage:\n  run_type: train\n  qat_modifiers:\n"
        f"    QuantizationModifier: {{scheme: W4A16, {_LINEARS}}}\n"
    ),
}


class Bench:
    """The shared inputs (chunks, held-out ids) and the rows measured so far."""

    def __init__(self, args: Any) -> None:
        import datasets
        from transformers import AutoTokenizer

        from llmc.evaluate import heldout_token_ids

        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL))
        self.chunks = corpus_chunks(args.seq_len)  # [N, seq_len]
        self.dataset = datasets.Dataset.from_dict({"input_ids": self.chunks.tolist()})
        self.heldout = heldout_token_ids(self.tokenizer)
        self.rows: list[dict[str, Any]] = []
        self.timing: dict[str, Any] = {}
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    # The arguments every call shares: data, calibration, and (for train) the hyperparameters.
    def data_kwargs(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "max_seq_length": self.args.seq_len,
            "num_calibration_samples": self.args.calibration_samples,
            "shuffle_calibration_samples": False,  # the first chunks: benchlib's calibration chunks
            "seed": self.args.seed,
            "precision": "float32",
        }

    def train_kwargs(self, lr: float, steps: int) -> dict[str, Any]:
        return {
            **self.data_kwargs(),
            "max_steps": steps,
            "learning_rate": lr,
            "per_device_train_batch_size": self.args.batch,
            "lr_scheduler_type": "cosine",
            "warmup_steps": self.args.warmup,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": max(1, steps // 5),
            "trainer_args": {"disable_tqdm": True},
        }

    def perplexity(self, model: Any) -> float:
        from llmc.evaluate import perplexity

        return round(perplexity(model.eval(), self.heldout, seq_len=EVAL_SEQ_LEN), 4)

    def row(self, label: str, model: Any, seconds: float, **facts: Any) -> dict[str, Any]:
        row = {"label": label, "perplexity": self.perplexity(model), "seconds": round(seconds, 2), **facts}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()
        return row

    def write(self) -> None:
        args = self.args
        results = {
            "name": args.name,
            "date": self.started,
            "machine": machine(),
            "versions": our_versions(),
            "model": "llmc:tiny-llama (hidden 256, 4 layers, fp32)",
            "configuration": {
                "steps": args.steps,
                "learning_rates": args.lrs,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "calibration": f"{args.calibration_samples} x {args.seq_len}",
                "warmup_steps": args.warmup,
                "schedule": "cosine, AdamW (transformers defaults), weight decay 0, clip 1.0",
                "seed": args.seed,
                "train_text": f"llmc:stdlib-docs, {len(self.chunks)} chunks of {args.seq_len}",
                "heldout": f"llmc:stdlib-docs-heldout, {len(self.heldout)} tokens, chunks of {EVAL_SEQ_LEN}",
                "recipes": RECIPES,
            },
            "rows": self.rows,
            "recovery": recovery(self.rows),
            "timing": self.timing,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")


def recovery(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``(compressed − P)/(compressed − dense)`` of each trained row against its one-shot start."""
    ppl = {row["label"]: row["perplexity"] for row in rows}
    out: dict[str, Any] = {}
    dense = ppl.get("P0 dense")
    for row in rows:
        start = row.get("from")
        if dense is None or start not in ppl or ppl[start] == dense:
            continue
        out[row["label"]] = round((ppl[start] - row["perplexity"]) / (ppl[start] - dense), 4)
    return out


def _timed(call: Any, **kwargs: Any) -> tuple[Any, float]:
    wait_until_idle(120)
    started = time.perf_counter()
    result = call(**kwargs)
    return result, time.perf_counter() - started


def sparse_rows(bench: Bench) -> None:
    import llmc

    result, seconds = _timed(
        llmc.oneshot, model=str(EMBEDDED_MODEL), recipe=recipe_text("sparsegpt-2:4"), **bench.data_kwargs()
    )
    bench.row("P1 SparseGPT 2:4", result.model, seconds)
    for lr in bench.args.lrs:
        for label, recipe, extra in (
            ("P2 2:4 + fine-tune", "finetune-2:4", {}),
            ("P3 2:4 + distill", "distill-2:4", {"distill_teacher": "self"}),
        ):
            result, seconds = _timed(
                llmc.train, model=str(EMBEDDED_MODEL), recipe=RECIPES[recipe],
                **bench.train_kwargs(lr, bench.args.steps), **extra,
            )
            report = result.report
            bench.row(
                f"{label} lr {lr:g}", result.model, seconds, **{"from": "P1 SparseGPT 2:4"},
                lr=lr, steps=report["train_steps"], train_s=report["train_s"],
                first_loss=report["first_loss"], last_loss=report["last_loss"],
            )


def w4a16_rows(bench: Bench) -> None:
    import llmc

    for label, recipe in (("RTN W4A16", "llmc:w4a16"), ("GPTQ W4A16", recipe_text("gptq-w4a16"))):
        result, seconds = _timed(llmc.oneshot, model=str(EMBEDDED_MODEL), recipe=recipe, **bench.data_kwargs())
        bench.row(label, result.model, seconds)
    for lr in bench.args.lrs:
        result, seconds = _timed(
            llmc.train, model=str(EMBEDDED_MODEL), recipe=RECIPES["qat-w4a16"],
            **bench.train_kwargs(lr, bench.args.steps),
        )
        report = result.report
        bench.row(
            f"QAT W4A16 lr {lr:g}", result.model, seconds, **{"from": "GPTQ W4A16"}, lr=lr,
            steps=report["train_steps"], train_s=report["train_s"],
            first_loss=report["first_loss"], last_loss=report["last_loss"],
        )


def dense_rows(bench: Bench) -> None:
    import llmc

    for lr in bench.args.lrs:
        result, seconds = _timed(
            llmc.train, model=str(EMBEDDED_MODEL), recipe=None, **bench.train_kwargs(lr, bench.args.steps)
        )
        report = result.report
        bench.row(
            f"P0 dense + fine-tune lr {lr:g}", result.model, seconds, lr=lr, steps=report["train_steps"],
            train_s=report["train_s"], first_loss=report["first_loss"], last_loss=report["last_loss"],
        )


def timing(bench: Bench) -> None:
    """Seconds per step: ``llmc.train`` with ``ConstantPruningModifier`` vs a plain Trainer."""
    import tempfile

    import torch
    import transformers

    import llmc
    from llmc.args import TrainingArguments as OurTrainingArguments
    from llmc.entrypoints.trainer import hf_training_arguments

    args = bench.args
    steps, lr = args.timing_steps, args.lrs[0]
    pruned = llmc.oneshot(
        model=str(EMBEDDED_MODEL), recipe=recipe_text("sparsegpt-2:4"), **bench.data_kwargs()
    ).model
    samples = [{"input_ids": row} for row in bench.chunks]
    kwargs = bench.train_kwargs(lr, steps)
    scratch = tempfile.mkdtemp(prefix="llmc-bench-trainer-")

    def ours() -> float:
        result = llmc.train(model=copy.deepcopy(pruned).train(), tokenizer=bench.tokenizer,
                            recipe=RECIPES["hold-only"], **kwargs)
        return result.report["train_s"] / result.report["train_steps"]

    def plain() -> float:
        # The same TrainingArguments values as ours (transformers checks and fills them alike).
        ours_args = OurTrainingArguments(
            max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=kwargs["logging_steps"], trainer_args={"disable_tqdm": True},
        )
        hf_args = hf_training_arguments(ours_args, output_dir=scratch, seed=args.seed, use_cpu=True)
        trainer = transformers.Trainer(
            model=copy.deepcopy(pruned).train(), args=hf_args, train_dataset=samples,
            data_collator=transformers.DataCollatorForLanguageModeling(bench.tokenizer, mlm=False),
        )
        started = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - started) / steps

    torch.manual_seed(args.seed)
    rounds = alternate(args.rounds, {"llmc train": ours, "plain Trainer": plain}, idle_wait_s=120)
    per_step = {name: [row[name]["value"] for row in rounds] for name in rounds[0]}
    medians = {name: statistics.median(values) for name, values in per_step.items()}
    bench.timing = {
        "steps": steps, "lr": lr, "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
        "order": "A B A B in one process (llmc train first in each round)",
        "per_step_s": {name: [round(v, 4) for v in values] for name, values in per_step.items()},
        "median_per_step_s": {name: round(v, 4) for name, v in medians.items()},
        "ratio_ours_over_plain": round(medians["llmc train"] / medians["plain Trainer"], 4),
        "load_before": {name: [row[name]["load_before"] for row in rounds] for name in rounds[0]},
    }
    print(json.dumps(bench.timing), flush=True)
    bench.write()


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every trained row")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated learning rates, each run for P2, P3 and QAT")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training and calibration sample")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="A B A B rounds of the timing part")
    parser.add_argument("--name", default="distill-recovery", help="results/<name>.json")
    args = parse(parser, argv)
    parts = names(parser, args.parts, PARTS, "parts")
    args.lrs = [float(value) for value in args.lrs.split(",") if value]
    print(machine_line(), "load", load_average(), flush=True)

    import transformers

    transformers.logging.set_verbosity_error()
    bench = Bench(args)
    if "timing" in parts:  # first: the quietest minutes of a run
        timing(bench)
    if any(part in parts for part in ("sparse", "w4a16", "dense")):
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_MODEL), dtype="float32")
        bench.row("P0 dense", dense, 0.0)
    if "sparse" in parts:
        sparse_rows(bench)
    if "w4a16" in parts:
        w4a16_rows(bench)
    if "dense" in parts:
        dense_rows(bench)
    print(json.dumps({"recovery": recovery(bench.rows)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
