"""Held-out perplexity of RTN, AWQ, GPTQ, AWQ + GPTQ and SmoothQuant, ours and llm-compressor's.

Run with llmc's venv (needs llmc-awq and llmc-gptq installed; the peer's venv for its side)::

    python benchmarks/awq_quality.py                       # every recipe, both tools, 128 x 512
    python benchmarks/awq_quality.py --recipes awq-w4a16-asym,rtn-w4a16-asym --no-peer

The recipes are ``benchlib.recipes.AWQ_RECIPES``: W4A16_ASYM and W4A16 (int4, groups of 128)
by round-to-nearest, AWQ, GPTQ and AWQ followed by GPTQ, and W8A8 with and without SmoothQuant
(``SMOOTHQUANT_STRENGTH``), in llm-compressor 0.14's layout (the smoothing modifier first, the
quantizer with the scheme after it in the same stage), the same names for both tools. The
shared driver (``benchlib.driver``) runs each configuration as its own process on the embedded
model and the same calibration chunks, and evaluates each checkpoint in another process
(transformers + compressed-tensors). This is a quality benchmark: the runs are timed by the
driver, but times from a busy machine are not the numbers to quote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchlib import driver
from benchlib.data import prepare
from benchlib.env import BENCH_ROOT, PEER_PYTHON, RESULTS_DIR, names, parse, script_parser
from benchlib.recipes import AWQ_RECIPES, OURS_RECIPES


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=1, timeout_min=40.0, idle_wait=0.0)
    parser.add_argument("--recipes", default=",".join(AWQ_RECIPES), help="comma-separated recipe names")
    parser.add_argument("--no-peer", action="store_true", help="only our side")
    args = parse(parser, argv)
    recipes = names(parser, args.recipes, OURS_RECIPES, "recipes")
    model_dir, chunks = prepare(args.model, args.samples, args.seq_len)
    peer = not args.no_peer and Path(PEER_PYTHON).exists()
    configs = []
    for recipe in recipes:
        configs.append(driver.ours(f"ours:{recipe}", model_dir, chunks, "--recipe", recipe, rounds=1))
        if peer and recipe in AWQ_RECIPES:
            configs.append(driver.peer(f"peer:{recipe}", model_dir, chunks, recipe, rounds=1))
    name = args.name or "awq-quality"
    work = BENCH_ROOT / "runs" / name
    baseline, _ = driver.evaluate_checkpoint(model_dir, work / "logs" / "uncompressed.ppl.log")
    print(f"uncompressed model: perplexity {baseline}", flush=True)
    runs = driver.interleave(
        configs, work=work, idle_wait_s=args.idle_wait, timeout_s=args.timeout_min * 60, evaluate_rounds=1
    )
    table = {recipe: {"ours": None, "peer": None} for recipe in recipes}
    for run in runs:
        tool, _, recipe = run["label"].partition(":")
        table[recipe][tool] = run.get("perplexity")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({"baseline_perplexity": baseline, "perplexity": table, "runs": runs}, indent=2, default=str))
    print(f"\nheld-out perplexity (uncompressed {baseline:.3f})\n")
    print("| recipe | llmc | llm-compressor 0.14 | llmc / peer |")
    print("| --- | --- | --- | --- |")
    for recipe, row in table.items():
        ours, theirs = row["ours"], row["peer"]
        ratio = f"{ours / theirs:.4f}" if ours and theirs else "—"
        print(f"| {recipe} | {ours and f'{ours:.3f}' or '—'} | {theirs and f'{theirs:.3f}' or '—'} | {ratio} |")
    print(f"\nresults: {out}")
    return 0 if all(r["returncode"] == 0 or r.get("skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
