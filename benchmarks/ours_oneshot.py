"""llmc's oneshot on the benchmark's model and calibration chunks: one run, one process.

Run with llmc's venv (usually started by a driver, under ``/usr/bin/time -v``)::

    python benchmarks/ours_oneshot.py --model DIR --chunks FILE --recipe gptq-w4a16 --output DIR
    python benchmarks/ours_oneshot.py --model DIR --chunks FILE --floor [--precision bfloat16]

``--recipe`` is one of ``benchlib.recipes.OURS_RECIPES``; ``--actorder`` and
``--true-sequential`` change every GPTQModifier in it; ``--gptq-refills-masks`` lets them fill
the zeros a pruning step left (llm-compressor 0.14's GPTQ, for comparisons). ``--precision`` is
the dtype the model is loaded and calibrated in (Hessians are float32 whatever it is);
``--calibration-precision`` the dtype the calibration forwards autocast to. ``--floor``
compresses nothing: llmc's pipeline with the calibration passes alone (``benchlib.pipeline``),
the floor any calibrated recipe pays.

Prints, as its last line, a JSON object with its own timings (``oneshot_s``: the call alone,
without interpreter start and imports) and what the run report says (GPTQ solve seconds and
output error, sparsity reached). A recipe whose plugin is not installed is reported and the
script exits with status 3.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchlib import child
from benchlib.child import (
    EXIT_PLUGIN_MISSING,
    calibration_arguments,
    load_chunks,
    print_report,
    run_facts,
)
from benchlib.env import parse, script_parser
from benchlib.recipes import OURS_RECIPES, modifiers_of, recipe_text


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The run report's figures worth a benchmark line: solves, output error, sparsity."""
    rows = [row for row in report.get("modules", []) if row.get("module") != "(model)"]
    figures: dict[str, Any] = {"calibration_samples": report.get("calibration_samples")}
    seconds = [row["seconds"] for row in rows if row.get("seconds") is not None]
    if seconds:
        figures["solves_s"] = round(sum(seconds), 2)
    layer_ends = [layer["solve_seconds"] for layer in report.get("layers", []) if "solve_seconds" in layer]
    if layer_ends:  # wall time at the layers' ends: the solves, and under torchrun their sharing
        figures["solve_s"] = round(sum(layer_ends), 2)
    errors = [row["output_error"] for row in rows if row.get("output_error") is not None]
    if errors:
        figures["mean_output_error"] = round(sum(errors) / len(errors), 6)
    pruned = [row["sparsity"] for row in rows if "sparsity" in row]
    if pruned:
        figures["pruned_modules"] = len(pruned)
        figures["mean_sparsity"] = round(sum(pruned) / len(pruned), 6)
        model_row = next(
            (row for row in report.get("modules", []) if row.get("module") == "(model)"), {}
        )
        figures["sparsity_config"] = model_row.get("sparsity_config")
    return figures


def refill_sparsity_masks() -> None:
    """Every GPTQ run of this process lets its updates fill pruned weights (``keep_sparsity_mask``)."""
    from llmc_gptq import GPTQModifier

    start = GPTQModifier.start

    def start_refilling(self: Any, context: Any) -> Any:
        run = start(self, context)
        run.keep_sparsity_mask = False
        return run

    GPTQModifier.start = start_refilling


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    child.add_arguments(parser)
    parser.add_argument(
        "--recipe", choices=sorted(OURS_RECIPES), help="what to run (not with --floor)"
    )
    parser.add_argument("--output", help="where the compressed checkpoint goes")
    parser.add_argument(
        "--floor", action="store_true", help="calibration forwards only, no compression"
    )
    parser.add_argument(
        "--precision", default="auto", help="model dtype for calibration (auto: the checkpoint's)"
    )
    parser.add_argument(
        "--calibration-precision", default="auto", help="dtype the calibration forwards autocast to"
    )
    parser.add_argument(
        "--batch-size", type=int, help="calibration samples per forward (default: llmc's)"
    )
    parser.add_argument(
        "--actorder", help="GPTQ act-order: static, weight, group or null (default: llmc-gptq's)"
    )
    parser.add_argument(
        "--true-sequential", action="store_true", default=None, help="GPTQ: re-run each group"
    )
    parser.add_argument(
        "--offload", default="auto", help="where the weights live: auto, none, cpu or disk (llmc.offload)"
    )
    parser.add_argument(
        "--gptq-refills-masks",
        action="store_true",
        help="GPTQ fills the zeros a pruning step left, as llm-compressor 0.14 does (comparisons only)",
    )
    args = parse(parser, argv)
    if args.floor == (args.recipe is not None):
        parser.error("give exactly one of --recipe and --floor")
    if args.recipe is not None and args.output is None:
        parser.error("--recipe needs --output")

    chunks = load_chunks(args.chunks, args.order_seed)  # [n, seq_len]
    facts = run_facts(
        "llmc",
        chunks,
        recipe="floor" if args.floor else args.recipe,
        precision=args.precision,
        calibration_precision=args.calibration_precision,
        batch_size=args.batch_size,
        actorder=args.actorder,
        true_sequential=args.true_sequential,
        offload=args.offload,
    )
    if args.floor:
        from benchlib.pipeline import run_floor  # imports llmc: kept out of oneshot_s

        imported = time.perf_counter()
        timings = run_floor(
            args.model,
            chunks,
            precision=args.precision,
            calibration_precision=args.calibration_precision,
            batch_size=args.batch_size or 1,
        )
        print_report(facts, imported, **timings)
        return 0

    from benchlib.pipeline import missing_plugin

    problem = missing_plugin(modifiers_of(args.recipe))
    if problem is not None:
        print(f"ours_oneshot: recipe {args.recipe!r} cannot run: {problem}", file=sys.stderr)
        print_report(facts, None, error="plugin-missing", message=problem)
        return EXIT_PLUGIN_MISSING
    try:
        recipe = recipe_text(
            args.recipe, actorder=args.actorder, true_sequential=args.true_sequential
        )
    except ValueError as error:
        parser.error(str(error))

    from llmc import oneshot  # the entrypoint imports lazily: keep that out of oneshot_s

    if args.gptq_refills_masks:
        refill_sparsity_masks()
    calibration = calibration_arguments(chunks)
    imported = time.perf_counter()
    result = oneshot(
        model=args.model,
        recipe=recipe,
        **calibration,
        output_dir=args.output,
        overwrite=True,
        precision=args.precision,
        calibration_precision=args.calibration_precision,
        offload=args.offload,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    oneshot_s = round(time.perf_counter() - imported, 2)
    print_report(facts, imported, oneshot_s=oneshot_s, **report_figures(result.report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
