"""llmc's oneshot on the benchmark's model and calibration chunks (same interface as the peer's).

Run with llmc's venv::

    python benchmarks/ours_oneshot.py --model DIR --chunks FILE --recipe rtn-w4a16 --output DIR
    python benchmarks/ours_oneshot.py --model DIR --chunks FILE --floor

``--floor`` compresses nothing: it loads the model and runs llmc's layer-by-layer pipeline with a
lifecycle that only asks for the calibration pass of every layer, so it measures the floor any
calibrated recipe pays (capture, one calibration pass and one propagation pass per layer).

Prints, as its last line, a JSON object with its own timings. A recipe whose plugin is not
installed is reported on stderr and the script exits with status 3.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_started = time.perf_counter()

from llmc import hookimpl  # noqa: E402

_TARGETS = "targets: [Linear], ignore: [lm_head]"
RECIPES: dict[str, tuple[str, str | None]] = {
    # name: (recipe for llmc.oneshot, modifier that a plugin must provide, or None for core)
    "rtn-w4a16": ("llmc:w4a16", None),
    "gptq-w4a16": (
        "quant_stage:\n  quant_modifiers:\n"
        "    GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}\n",
        "GPTQModifier",
    ),
    "sparsegpt-50": (
        "sparsity_stage:\n  sparsity_modifiers:\n"
        f"    SparseGPTModifier: {{sparsity: 0.5, mask_structure: '0:0', {_TARGETS}}}\n",
        "SparseGPTModifier",
    ),
    "sparsegpt-2:4": (
        "sparsity_stage:\n  sparsity_modifiers:\n"
        f"    SparseGPTModifier: {{sparsity: 0.5, mask_structure: '2:4', {_TARGETS}}}\n",
        "SparseGPTModifier",
    ),
    "wanda-50": (
        "sparsity_stage:\n  sparsity_modifiers:\n"
        f"    WandaPruningModifier: {{sparsity: 0.5, mask_structure: '0:0', {_TARGETS}}}\n",
        "WandaPruningModifier",
    ),
}
EXIT_PLUGIN_MISSING = 3


class _CalibrationOnly:
    """A run state that asks for every layer's calibration pass and changes nothing."""

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):  # noqa: ARG002
        return True


def run_floor(model_dir: str, calibration_precision: str, chunks) -> dict[str, float]:
    """Load the model and run the pipeline's forwards only; return phase timings."""
    import torch

    from llmc import ModelArguments, RunContext
    from llmc.data import make_batches, padding_token_id
    from llmc.models import calibration_dtype, load_model, load_tokenizer
    from llmc.pipeline import LayerwisePipeline, make_lifecycle

    started = time.perf_counter()
    model_args = ModelArguments(model=model_dir, calibration_precision=calibration_precision)
    model = load_model(model_args)
    tokenizer = load_tokenizer(model_args, model)
    batches = make_batches(list(chunks), 1, padding_token_id(tokenizer))
    loaded = time.perf_counter()
    context = RunContext(
        model=model, device=next(model.parameters()).device, tokenizer=tokenizer,
        compute_dtype=calibration_dtype(model_args, model),
    )
    pipeline = LayerwisePipeline(
        model=model, context=context, lifecycle=make_lifecycle([_CalibrationOnly()])
    )
    with torch.no_grad():
        pipeline.run(batches)
    finished = time.perf_counter()
    return {
        "load_s": round(loaded - started, 2),
        "pipeline_s": round(finished - loaded, 2),
        "oneshot_s": round(finished - started, 2),
        "layer_s": {name: round(s, 2) for name, s in pipeline.timings.items()},
    }


def check_plugin(modifier: str | None) -> str | None:
    """None when the modifier is available, else the message saying what to install."""
    if modifier is None:
        return None
    from llmc import PluginError
    from llmc.plugins import load_registry

    try:
        load_registry().resolve(modifier)
    except PluginError as error:
        return str(error)
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--chunks", required=True, help="safetensors file with input_ids [n, seq_len]")
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="what to run (not with --floor)")
    parser.add_argument("--output", help="where the compressed checkpoint goes")
    parser.add_argument("--floor", action="store_true", help="calibration forwards only, no compression")
    parser.add_argument("--calibration-precision", default="auto", help="dtype the calibration forwards autocast to")
    args = parser.parse_args(argv)
    if args.floor == (args.recipe is not None):
        parser.error("give exactly one of --recipe and --floor")
    if args.recipe is not None and args.output is None:
        parser.error("--recipe needs --output")

    import torch
    from safetensors.torch import load_file

    chunks = load_file(args.chunks)["input_ids"].to(torch.long)  # [n, seq_len]
    n, seq_len = chunks.shape
    info: dict[str, object] = {
        "tool": "llmc",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "recipe": "floor" if args.floor else args.recipe,
        "calibration_precision": args.calibration_precision,
        "samples": int(n),
        "seq_len": int(seq_len),
    }

    if args.floor:
        import llmc.models  # noqa: F401  (transformers; keep imports out of oneshot_s)
        import llmc.pipeline  # noqa: F401

        imported = time.perf_counter()
        timings = run_floor(args.model, args.calibration_precision, chunks)
    else:
        recipe, modifier = RECIPES[args.recipe]
        problem = check_plugin(modifier)
        if problem is not None:
            print(f"ours_oneshot: recipe {args.recipe!r} cannot run: {problem}", file=sys.stderr)
            print(json.dumps({**info, "error": "plugin-missing", "message": problem}), flush=True)
            return EXIT_PLUGIN_MISSING
        from datasets import Dataset

        from llmc import oneshot  # the entrypoint imports lazily: keep that out of oneshot_s

        dataset = Dataset.from_dict(
            {"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()}
        )
        imported = time.perf_counter()
        result = oneshot(
            model=args.model,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=int(n),
            max_seq_length=int(seq_len),
            output_dir=args.output,
            calibration_precision=args.calibration_precision,
        )
        finished = time.perf_counter()
        timings = {"oneshot_s": round(finished - imported, 2)}
        info["calibration_samples"] = result.report.get("calibration_samples")
    print(
        json.dumps(
            {
                **info,
                "import_s": round(imported - _started, 2),
                **timings,
                "total_s": round(time.perf_counter() - _started, 2),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
