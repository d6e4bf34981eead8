"""llmc vs llm-compressor, side by side on this machine, one recipe name for both (llmc's venv).

    python benchmarks/compare.py --model embedded --recipe gptq-w4a16
    python benchmarks/compare.py --model wide --ours-recipe floor,rtn-w4a16 --peer-recipe gptq-w4a16
    python benchmarks/compare.py --ours-recipe sparsegpt-2:4,sparsegpt-2:4@bfloat16 --peer-recipe sparsegpt-2:4
    python benchmarks/compare.py --model llama8b-8 --ours-recipe rtn-w4a16+disk,gptq-w4a16+disk \
        --peer-recipe rtn-w4a16 --repeats 1

The shared driver (``benchlib.driver``) runs each configuration as its own process under
``/usr/bin/time -v``, interleaved (ours, peer, ours, peer, ...), and reports medians of wall
time, peak RSS and (embedded model) held-out perplexity of each checkpoint, with the ratio ours
/ peer. ``@bfloat16`` after one of our recipes calibrates it with ``calibration_precision:
bfloat16``; ``+disk`` (``+cpu``, ``+none``) after it sets ``offload`` (``llmc.offload``: ``disk``
streams the model a layer at a time); ``floor`` is our calibration forwards alone. Without the peer's venv
(``.venv-peer``) only our numbers are reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import driver
from benchlib.env import parse, script_parser
from benchlib.recipes import OURS_RECIPES, PEER_RECIPES

PRECISIONS = ("", "bfloat16", "float16")


OFFLOADS = ("", "none", "cpu", "disk")


def our_args(spec: str) -> tuple[str, ...]:
    """``ours_oneshot.py``'s arguments for ``floor`` or ``RECIPE[@PRECISION][+OFFLOAD]``."""
    spec, _, offload = spec.partition("+")
    name, _, precision = spec.partition("@")
    args = ("--floor",) if name == "floor" else ("--recipe", name)
    if precision:
        args = (*args, "--calibration-precision", precision)
    return (*args, "--offload", offload) if offload else args


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=3, timeout_min=25.0)
    parser.add_argument(
        "--recipe", help="recipe for both tools (sets --ours-recipe and --peer-recipe)"
    )
    parser.add_argument(
        "--ours-recipe",
        help=f"comma-separated, of: floor, {', '.join(OURS_RECIPES)}; append @bfloat16 to calibrate in bf16 autocast",
    )
    parser.add_argument("--peer-recipe", help=f"one of: {', '.join(PEER_RECIPES)}, or 'none'")
    parser.add_argument("--peer-repeats", type=int, help="runs of the peer (default: --repeats)")
    args = parse(parser, argv)

    ours = [r for r in (args.ours_recipe or args.recipe or "").split(",") if r]
    peer_recipe = args.peer_recipe or (args.recipe if args.recipe in PEER_RECIPES else None)
    if peer_recipe == "none":
        peer_recipe = None
    for spec in ours:
        head, _, offload = spec.partition("+")
        name, _, precision = head.partition("@")
        if (name != "floor" and name not in OURS_RECIPES) or precision not in PRECISIONS or offload not in OFFLOADS:
            parser.error(
                f"unknown recipe {spec!r} for ours; one of floor, {', '.join(OURS_RECIPES)}"
            )
    if peer_recipe is not None and peer_recipe not in PEER_RECIPES:
        parser.error(
            f"unknown recipe {peer_recipe!r} for the peer; one of {', '.join(PEER_RECIPES)}"
        )
    if not ours and peer_recipe is None:
        parser.error("nothing to run: give --recipe, --ours-recipe or --peer-recipe")
    peer_repeats = args.repeats if args.peer_repeats is None else args.peer_repeats

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        out = [
            driver.ours(f"ours:{spec}", model_dir, chunks, *our_args(spec), rounds=args.repeats)
            for spec in ours
        ]
        if peer_recipe is not None:
            out.append(
                driver.peer(
                    f"peer:{peer_recipe}", model_dir, chunks, peer_recipe, rounds=peer_repeats
                )
            )
        return out

    peer_part = [f"vs-peer-{peer_recipe}"] if peer_recipe else []
    name = "-".join([args.model, *ours, *peer_part]).replace(":", "_").replace("@", "_").replace("+", "_")
    return driver.compare(args, configs, default_name=name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
