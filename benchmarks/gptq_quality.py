"""Held-out perplexity of FP, RTN and GPTQ variants on one model (quality, and time).

Run with llmc's venv (needs llmc-gptq installed)::

    python benchmarks/gptq_quality.py                        # every variant, 128 x 512 tokens
    python benchmarks/gptq_quality.py --variants fp,rtn-w4a16,gptq-w4a16 --json out.json
    python benchmarks/gptq_quality.py --model smollm2 --variants fp,rtn-w4a16-g64,gptq-w4a16-g64-actorder

Every variant starts from a fresh copy of the model (``--model``: the embedded tiny Llama,
fp32, by default; or a real one, ``benchlib.real_models``, bf16), calibrates on the same chunks
of the embedded corpus (``benchlib.data.chunks_file``, the file compare.py uses) through llmc's
layer-by-layer pipeline with batch size 1, as ``oneshot`` does,
and is evaluated in memory (the in-memory model computes what its checkpoint computes; the
tests check that) on the held-out split ``llmc:stdlib-docs-heldout``, chunks of 512 tokens.

GPTQ variants differ in one knob at a time from the defaults: ``actorder`` (null / weight),
``true_sequential``, and the moment group scales are computed (``lazy``: when the sweep reaches
the group, from the error-updated weights; ``upfront``: from the original weights, as
llm-compressor does), and ``dampening_frac``. ``-g64`` variants use groups of 64 (for widths
128 does not divide, SmolLM2's 576). Also reported per variant: seconds spent in the pipeline, with the share
spent in GPTQ solves (from the run report).
"""

from __future__ import annotations

import sys
from typing import Any

from benchlib.child import load_chunks, reorder
from benchlib.data import MODELS, chunks_file, model_dir
from benchlib.env import load_average, machine_line, names, parse, print_json_line, script_parser

GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
CHANNEL4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
GROUP3 = {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
GROUP64 = {**GROUP, "group_size": 64}


def _groups(weights: dict[str, Any]) -> dict[str, Any]:
    return {"group_0": {"targets": ["Linear"], "weights": dict(weights)}}


# name: (method, config_groups or preset, GPTQ options, run-state options)
VARIANTS: dict[str, tuple[str, Any, dict[str, Any], dict[str, Any]]] = {
    "fp": ("fp", None, {}, {}),
    "rtn-w4a16": ("rtn", "W4A16", {}, {}),
    "gptq-w4a16": ("gptq", "W4A16", {"actorder": None, "true_sequential": False}, {}),
    "gptq-w4a16-actorder": ("gptq", "W4A16", {"actorder": "weight", "true_sequential": False}, {}),
    "gptq-w4a16-trueseq": ("gptq", "W4A16", {"actorder": None, "true_sequential": True}, {}),
    "gptq-w4a16-actorder-trueseq": ("gptq", "W4A16", {"actorder": "weight", "true_sequential": True}, {}),
    "gptq-w4a16-upfront": ("gptq", "W4A16", {"actorder": None, "true_sequential": False}, {"lazy_group_params": False}),
    "gptq-w4a16-actorder-upfront": ("gptq", "W4A16", {"actorder": "weight", "true_sequential": False}, {"lazy_group_params": False}),
    "rtn-w4a16-channel": ("rtn", _groups(CHANNEL4), {}, {}),
    "gptq-w4a16-channel": ("gptq", _groups(CHANNEL4), {"actorder": None, "true_sequential": False}, {}),
    "gptq-w4a16-channel-actorder": ("gptq", _groups(CHANNEL4), {"actorder": "weight", "true_sequential": False}, {}),
    "rtn-w3a16": ("rtn", _groups(GROUP3), {}, {}),
    "gptq-w3a16": ("gptq", _groups(GROUP3), {"actorder": None, "true_sequential": False}, {}),
    "gptq-w3a16-actorder": ("gptq", _groups(GROUP3), {"actorder": "weight", "true_sequential": False}, {}),
    "gptq-w3a16-upfront": ("gptq", _groups(GROUP3), {"actorder": None, "true_sequential": False}, {"lazy_group_params": False}),
    "gptq-w3a16-actorder-upfront": ("gptq", _groups(GROUP3), {"actorder": "weight", "true_sequential": False}, {"lazy_group_params": False}),
    "gptq-w3a16-trueseq": ("gptq", _groups(GROUP3), {"actorder": None, "true_sequential": True}, {}),
    "gptq-w3a16-actorder-trueseq": ("gptq", _groups(GROUP3), {"actorder": "weight", "true_sequential": True}, {}),
    "gptq-w4a16-static": ("gptq", "W4A16", {"actorder": "static", "true_sequential": False}, {}),
    "gptq-w4a16-static-upfront": ("gptq", "W4A16", {"actorder": "static", "true_sequential": False}, {"lazy_group_params": False}),
    "rtn-w4a16-g64": ("rtn", _groups(GROUP64), {}, {}),
    "gptq-w4a16-g64": ("gptq", _groups(GROUP64), {"actorder": None, "true_sequential": False}, {}),
    "gptq-w4a16-g64-actorder": ("gptq", _groups(GROUP64), {"actorder": "static", "true_sequential": False}, {}),
    "gptq-w4a16-g64-actorder-upfront": ("gptq", _groups(GROUP64), {"actorder": "static", "true_sequential": False}, {"lazy_group_params": False}),
    "gptq-w4a16-g64-upfront": ("gptq", _groups(GROUP64), {"actorder": None, "true_sequential": False}, {"lazy_group_params": False}),
    "gptq-w4a16-g64-actorder-damp0.001": ("gptq", _groups(GROUP64), {"actorder": "static", "true_sequential": False, "dampening_frac": 0.001}, {}),
    "gptq-w4a16-g64-actorder-damp0.1": ("gptq", _groups(GROUP64), {"actorder": "static", "true_sequential": False, "dampening_frac": 0.1}, {}),
}


def _make_modifier(method: str, scheme: Any, options: dict[str, Any]) -> Any:
    from llmc_gptq import GPTQModifier

    from llmc.modifiers import QuantizationModifier

    form = {"scheme": scheme} if isinstance(scheme, str) else {"config_groups": scheme}
    if method == "rtn":
        return QuantizationModifier(ignore=["lm_head"], **form)
    return GPTQModifier(ignore=["lm_head"], **form, **options)


def run_variant(
    model_path: Any,
    name: str,
    chunks: Any,
    heldout: Any,
    max_eval_chunks: int | None,
    order_seed: int | None = None,
    precision: str = "float32",
    calibration_precision: str = "auto",
) -> dict[str, Any]:
    """Calibrate a fresh copy of the model in ``model_path`` with variant ``name``; its perplexity and times."""
    from benchlib.pipeline import calibrate, load

    from llmc.evaluate import perplexity

    method, scheme, options, run_options = VARIANTS[name]
    load_before = load_average()
    report: list[dict[str, Any]] = []
    seconds = 0.0
    if method == "fp":
        model = load(model_path, precision=precision).model
    else:
        modifier = _make_modifier(method, scheme, options)

        def start(context: Any) -> Any:
            run = modifier.start(context)
            for key, value in run_options.items():
                setattr(run, key, value)
            return run

        chunks = reorder(chunks, order_seed)  # same tokens: H differs only by float rounding
        done = calibrate(
            model_path,
            chunks if method == "gptq" else None,
            start,
            precision=precision,
            calibration_precision=calibration_precision,
        )
        model, report, seconds = done.model, done.context.report, done.pipeline_s
    # Evaluated in float32 whatever the calibration precision, as compare.py evaluates
    # checkpoints (a bfloat16 weight or scale is exact in float32).
    ppl = perplexity(model.float(), heldout, seq_len=512, max_chunks=max_eval_chunks)
    solve_s = sum(row.get("seconds", 0.0) for row in report)
    output_errors = [row["output_error"] for row in report if row.get("output_error") is not None]
    return {
        "variant": name,
        "precision": precision,
        "calibration_precision": calibration_precision,
        "order_seed": order_seed,
        "perplexity": round(ppl, 4),
        "pipeline_s": round(seconds, 2),
        "solve_s": round(solve_s, 2),
        "mean_output_error": round(sum(output_errors) / len(output_errors), 6) if output_errors else None,
        "load_before": load_before,
        "load_after": load_average(),
    }


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--samples", type=int, help="calibration samples (default: per model)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-eval-chunks", type=int, default=None, help="held-out chunks of 512 (default: all)")
    parser.add_argument("--json", help="append results (JSON lines) here")
    parser.add_argument(
        "--order-seeds", default="", help="comma-separated seeds: also run each variant with the batches in a seeded "
        "order (same tokens), to see how much perplexity moves from float rounding alone",
    )
    parser.add_argument(
        "--only-order-seeds", action="store_true",
        help="run GPTQ variants only in the --order-seeds orders (not also in the file's order)",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="calibrate in this dtype (auto: the checkpoint's)")
    parser.add_argument("--calibration-precision", default="auto", help="autocast the calibration forwards to this dtype")
    args = parse(parser, argv)
    from transformers import AutoTokenizer

    from llmc.evaluate import heldout_token_ids

    directory = model_dir(args.model)
    path = chunks_file(args.samples or MODELS[args.model]["samples"], args.seq_len, args.model)  # compare.py's file
    chunks = load_chunks(path)
    heldout = heldout_token_ids(AutoTokenizer.from_pretrained(str(directory)))
    print(f"{machine_line()}; calibration {tuple(chunks.shape)} from {path}; held-out {heldout.numel()} tokens", flush=True)
    for name in names(parser, args.variants, VARIANTS, "variants"):
        seeds = [] if args.only_order_seeds else [None]
        seeds += [int(seed) for seed in args.order_seeds.split(",") if seed]
        for seed in seeds if VARIANTS[name][0] == "gptq" else [None]:
            result = run_variant(directory, name, chunks, heldout, args.max_eval_chunks, seed, args.precision, args.calibration_precision)
            print_json_line(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
