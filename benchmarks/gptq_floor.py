"""Where a GPTQ run's time goes, against the floor of the calibration forwards alone.

Run with llmc's venv (needs llmc-gptq installed)::

    python benchmarks/gptq_floor.py --model embedded            # 128 x 512 tokens
    python benchmarks/gptq_floor.py --model wide --rounds 3     # 16 x 512 tokens

In one process, on the same chunks compare.py uses, alternating A B A B
(``benchlib.inprocess.alternate``):

* ``floor``: llmc's layer-by-layer pipeline with a run state that only asks for every layer's
  calibration pass (``benchlib.pipeline.CalibrationOnly``), what ``ours_oneshot.py --floor``
  measures;
* ``gptq``: the same pipeline with ``GPTQModifier(scheme=W4A16, ignore=[lm_head])`` (the
  defaults, or ``--true-sequential``/``--actorder`` to change them).

Reported per round: pipeline seconds of each, the GPTQ solves (sum of the per-module
``seconds`` of the run report: damping, inverse Cholesky and sweep), and what remains
(Hessian products and hooks, plus re-runs with true_sequential). The model is reloaded for
every run (GPTQ quantizes it in place), outside the timed part.
"""

from __future__ import annotations

import json
import statistics
import sys

from benchlib.child import load_chunks
from benchlib.data import add_model_arguments, prepare
from benchlib.env import machine_line, parse, print_json_line, script_parser
from benchlib.inprocess import alternate

_MEDIANS = ("floor_s", "gptq_s", "solves_s", "hooks_and_reruns_s", "gptq_over_floor")


def _pipeline(model_dir, chunks, make_run_state) -> dict:
    """Pipeline seconds and run report of one calibration; the model is let go at once."""
    from benchlib.pipeline import calibrate

    run = calibrate(model_dir, chunks, make_run_state, precision="float32")
    return {"pipeline_s": run.pipeline_s, "report": run.context.report}


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--actorder", default="static")
    parser.add_argument("--json", help="append the result (one JSON line) here")
    parser.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait for an idle machine per run")
    args = parse(parser, argv)

    from benchlib.pipeline import CalibrationOnly
    from llmc_gptq import GPTQModifier

    model_dir, chunks_file = prepare(args.model, args.samples, args.seq_len)
    chunks = load_chunks(chunks_file)
    modifier = GPTQModifier(
        scheme="W4A16", ignore=["lm_head"], true_sequential=args.true_sequential, actorder=args.actorder
    )
    print(f"{machine_line()}; model {args.model}, calibration {tuple(chunks.shape)}; {modifier!r}", flush=True)
    steps = {
        "floor": lambda: _pipeline(model_dir, chunks, lambda context: CalibrationOnly()),
        "gptq": lambda: _pipeline(model_dir, chunks, modifier.start),
    }
    rounds = []
    for index, done in enumerate(alternate(args.rounds, steps, idle_wait_s=args.idle_wait)):
        floor, gptq = done["floor"], done["gptq"]
        report = gptq["value"]["report"]
        row = {
            "round": index,
            **{f"{kind}_busy_before": done[kind]["busy_before"] for kind in steps},
            **{f"{kind}_load": done[kind]["load_before"] for kind in steps},
            "floor_s": round(floor["value"]["pipeline_s"], 2),
            "gptq_s": round(gptq["value"]["pipeline_s"], 2),
            "solves_s": round(sum(r.get("seconds", 0.0) for r in report), 2),
            "modules": len(report),
        }
        row["hooks_and_reruns_s"] = round(row["gptq_s"] - row["floor_s"] - row["solves_s"], 2)
        row["gptq_over_floor"] = round(row["gptq_s"] / row["floor_s"], 3)
        print_json_line(row)
        rounds.append(row)
    summary = {
        "model": args.model,
        "true_sequential": args.true_sequential,
        "actorder": args.actorder,
        "rounds": rounds,
        **{f"median_{key}": statistics.median(r[key] for r in rounds) for key in _MEDIANS},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}), flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
