"""llm-compressor's oneshot on the benchmark's model and calibration chunks: one run, one process.

Run with the peer's own venv (it imports llmcompressor, never llmc)::

    .venv-peer/bin/python benchmarks/peer_oneshot.py --model DIR --chunks FILE \
        --recipe gptq-w4a16 --output DIR

The recipe names are ``benchlib.recipes.PEER_RECIPES``, each mapped to the llm-compressor 0.14
modifier with the parameters of our recipe of the same name. Prints, as its last line, a JSON
object with its own timings: ``load_s`` (``Oneshot(...)``: model + tokenizer loading and
preprocessing), ``run_s`` (calibration, compression and saving) and ``oneshot_s`` (both).
"""

from __future__ import annotations

import sys
import time

from benchlib import child
from benchlib.child import calibration_arguments, load_chunks, print_report, run_facts
from benchlib.env import parse, script_parser
from benchlib.recipes import AWQ_RECIPES, PEER_RECIPES, SCHEME_RECIPES, SMOOTHQUANT_STRENGTH


def _quantization_recipe(recipe: str) -> list:
    """AWQ / SmoothQuant / RTN / GPTQ names (``benchlib.recipes.AWQ_RECIPES``): 0.14's layout,
    the smoothing transform first and the quantizer with the scheme after it."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    steps, _, scheme = recipe.rpartition("-w")
    scheme = "W" + scheme.upper().replace("-ASYM", "_ASYM")
    quantizer = GPTQModifier if "gptq" in steps else QuantizationModifier
    modifiers = []
    if "awq" in steps:
        modifiers.append(AWQModifier(duo_scaling=True))
    if "smoothquant" in steps:
        modifiers.append(SmoothQuantModifier(smoothing_strength=SMOOTHQUANT_STRENGTH))
    modifiers.append(quantizer(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    return modifiers


def _cpu_workarounds() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``)
    before each mapping, which raises "Cannot access accelerator device" on a machine without
    one; pinning only speeds up host-to-GPU copies, so without a GPU it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

# int4 symmetric in groups of 64 (ours: benchlib.recipes' gptq-w4a16-g64)
W4_G64 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
        },
    }
}  # fmt: skip


def make_modifier(recipe: str):
    """The llm-compressor 0.14 modifier (or list of them) for one of the benchmark's recipe names.

    ``sparsegpt-2:4+gptq-*`` and ``sparsegpt-2:4-then-gptq-*`` are both modifiers in one list:
    llm-compressor 0.14 runs a sequential pipeline for each in turn (the whole model is pruned,
    then GPTQ calibrates on the pruned model), and its GPTQ does not keep the zeros SparseGPT
    left (its updates fill them), so that checkpoint is not 2:4 sparse.
    """
    pruner, joint, quantizer = recipe.partition("+") if "+" in recipe else recipe.partition("-then-")
    if pruner == "sparsegpt-2:4" and joint:
        return [make_modifier(pruner), make_modifier(quantizer)]
    if recipe in ("gptq-w4a16", "gptq-w4a16-g64", "gptq-w8a8"):
        from llmcompressor.modifiers.gptq import GPTQModifier

        if recipe == "gptq-w4a16-g64":
            return GPTQModifier(config_groups=W4_G64, ignore=["lm_head"])
        scheme = "W8A8" if recipe == "gptq-w8a8" else "W4A16"
        return GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    if recipe in AWQ_RECIPES:
        return _quantization_recipe(recipe)
    if recipe in SCHEME_RECIPES:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        method, scheme = SCHEME_RECIPES[recipe]
        quantizer = QuantizationModifier if method == "rtn" else GPTQModifier
        return quantizer(targets="Linear", scheme=scheme, ignore=["lm_head"])
    if recipe in ("sparsegpt-50", "sparsegpt-2:4"):
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=0.5,
            mask_structure="2:4" if recipe.endswith("2:4") else "0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
        )
    if recipe in ("wanda-50", "wanda-2:4"):
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(
            sparsity=0.5,
            mask_structure="2:4" if recipe.endswith("2:4") else "0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
        )
    raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(PEER_RECIPES)}")


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    child.add_arguments(parser)
    parser.add_argument("--recipe", required=True, choices=PEER_RECIPES)
    parser.add_argument("--output", required=True, help="where the compressed checkpoint goes")
    parser.add_argument(
        "--precision", default="auto", help="model dtype for calibration (auto: the checkpoint's)"
    )
    args = parse(parser, argv)

    import llmcompressor
    from llmcompressor.entrypoints.oneshot import Oneshot

    imported = time.perf_counter()
    chunks = load_chunks(args.chunks, args.order_seed)  # [n, seq_len]
    calibration = calibration_arguments(chunks)
    modifier = make_modifier(args.recipe)
    _cpu_workarounds()

    started = time.perf_counter()
    run = Oneshot(
        model=args.model,
        recipe=modifier,
        **calibration,
        output_dir=args.output,
        precision=args.precision,
    )
    loaded = time.perf_counter()
    run()
    finished = time.perf_counter()
    facts = run_facts(
        "llmcompressor",
        chunks,
        version=llmcompressor.__version__,
        recipe=args.recipe,
        precision=args.precision,
        device=str(next(run.model.parameters()).device),
    )
    print_report(
        facts,
        imported,
        load_s=round(loaded - started, 2),
        run_s=round(finished - loaded, 2),
        oneshot_s=round(finished - started, 2),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
