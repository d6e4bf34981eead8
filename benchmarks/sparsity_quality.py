"""Held-out perplexity of our pruning recipes on the embedded model (run in llmc's venv).

    python benchmarks/sparsity_quality.py                        # every recipe, 1 run each
    python benchmarks/sparsity_quality.py --recipes sparsegpt-2:4,wanda-2:4 --repeats 3

Complements ``compare.py`` (which runs SparseGPT 50 % / 2:4 and Wanda 50 % side by side with
llm-compressor): the dense model, magnitude pruning, Wanda 2:4, true-sequential SparseGPT and
pruning + W4A16, calibrated on the same 128 × 512 tokens. The shared driver
(``benchlib.driver``) runs each recipe as its own process (``ours_oneshot.py`` under
``/usr/bin/time -v``) and evaluates its checkpoint in another process (``perplexity.py``:
transformers + compressed-tensors); results go to ``results/<name>.json`` (default
``sparsity-quality``), with the mean sparsity each run reached.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import driver
from benchlib.env import names, parse, script_parser
from benchlib.recipes import OURS_RECIPES, SPARSITY_RECIPES


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=1, timeout_min=25.0)
    parser.add_argument(
        "--recipes", default=",".join(SPARSITY_RECIPES), help="comma-separated recipe names"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="model dtype for calibration (bfloat16: bf16 calibration)",
    )
    args = parse(parser, argv)
    recipes = names(parser, args.recipes, OURS_RECIPES, "recipes")

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        return [
            driver.ours(
                recipe,
                model_dir,
                chunks,
                "--recipe",
                recipe,
                "--precision",
                args.precision,
                rounds=args.repeats,
            )
            for recipe in recipes
        ]

    return driver.compare(args, configs, default_name="sparsity-quality")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
