"""Where a GPTQ run's time goes, against the floor of the calibration forwards alone.

Run with llmc's venv (needs llmc-gptq installed)::

    python benchmarks/gptq_floor.py --model embedded            # 128 x 512 tokens
    python benchmarks/gptq_floor.py --model wide --rounds 3     # 16 x 512 tokens

In one process, on the same loaded batches (the chunks compare.py uses), alternating A B A B:

* ``floor``: llmc's layer-by-layer pipeline with a run state that only asks for every layer's
  calibration pass (capture, one calibration pass and one propagation pass per layer), which
  is what ``ours_oneshot.py --floor`` measures;
* ``gptq``: the same pipeline with ``GPTQModifier(scheme=W4A16, ignore=[lm_head])`` (the
  defaults, or ``--true-sequential``/``--actorder`` to change them).

Reported per round: pipeline seconds of each, the GPTQ solves (sum of the per-module
``seconds`` of the run report: damping, inverse Cholesky and sweep), and what remains
(Hessian products and hooks, plus re-runs with true_sequential). The model is reloaded for
every GPTQ round (it is quantized in place), outside the timed part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import (  # noqa: E402
    BENCH_ROOT,
    EMBEDDED_MODEL,
    calibration_chunks,
    load_chunks,
    make_wide_llama,
    wait_until_idle,
)

from llmc import hookimpl  # noqa: E402

MODELS = {"embedded": (128, 512), "wide": (16, 512)}


class _CalibrationOnly:
    """A run state that asks for every layer's calibration pass and changes nothing."""

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):  # noqa: ARG002
        return True


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def _pipeline(model_dir: Path, batches, run_state_factory) -> tuple[float, list[dict], dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc import RunContext
    from llmc.pipeline import LayerwisePipeline, make_lifecycle

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    context = RunContext(model=model, device=torch.device("cpu"), tokenizer=tokenizer)
    run_state = run_state_factory(context)
    pipeline = LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([run_state]), show_progress=False)
    started = time.perf_counter()
    with torch.no_grad():
        pipeline.run(batches)
    return time.perf_counter() - started, context.report, dict(pipeline.timings)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--actorder", default="static")
    parser.add_argument("--json", help="append the result (one JSON line) here")
    parser.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait for an idle machine per run")
    args = parser.parse_args(argv)

    from llmc_gptq import GPTQModifier

    from llmc.data import make_batches

    samples, seq_len = MODELS[args.model]
    model_dir = EMBEDDED_MODEL if args.model == "embedded" else make_wide_llama(BENCH_ROOT / "wide-llama")
    path = BENCH_ROOT / f"chunks-{samples}x{seq_len}.safetensors"
    chunks = load_chunks(path) if path.is_file() else calibration_chunks(samples, seq_len, path)
    batches = make_batches(list(chunks), 1, 0)  # as oneshot: batch size 1, no padding needed
    modifier = GPTQModifier(
        scheme="W4A16", ignore=["lm_head"], true_sequential=args.true_sequential, actorder=args.actorder
    )
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"model {args.model}, calibration {tuple(chunks.shape)}; {modifier!r}", flush=True)
    rounds = []
    for index in range(args.rounds):
        row: dict[str, object] = {"round": index}
        for kind in ("floor", "gptq"):
            row[f"{kind}_busy_before"] = wait_until_idle(args.idle_wait)
            row[f"{kind}_load"] = _load()
            factory = (lambda context: _CalibrationOnly()) if kind == "floor" else modifier.start
            seconds, report, _ = _pipeline(model_dir, batches, factory)
            row[f"{kind}_s"] = round(seconds, 2)
            if kind == "gptq":
                row["solves_s"] = round(sum(r.get("seconds", 0.0) for r in report), 2)
                row["modules"] = len(report)
        row["hooks_and_reruns_s"] = round(row["gptq_s"] - row["floor_s"] - row["solves_s"], 2)
        row["gptq_over_floor"] = round(row["gptq_s"] / row["floor_s"], 3)
        print(json.dumps(row), flush=True)
        rounds.append(row)
    summary = {
        "model": args.model,
        "true_sequential": args.true_sequential,
        "actorder": args.actorder,
        "rounds": rounds,
        **{f"median_{k}": statistics.median(r[k] for r in rounds) for k in ("floor_s", "gptq_s", "solves_s", "hooks_and_reruns_s", "gptq_over_floor")},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}), flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
