"""llmc's oneshot with the sparsity recipes ``ours_oneshot.py`` does not list (run in llmc's venv).

    python benchmarks/sparsity_oneshot.py --model DIR --chunks FILE --recipe magnitude-2:4 --output DIR

Same interface and output as ``ours_oneshot.py`` (last line: a JSON object with its own timings);
the recipes are the pruning baselines and the pruning + quantization combinations of
``docs/benchmarks.md``'s sparsity section. Exits with status 3 when a plugin is missing.
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

_TARGETS = "targets: [Linear], ignore: [lm_head]"


def _stage(*modifiers: str) -> str:
    return "sparsity_stage:\n  sparsity_modifiers:\n" + "".join(f"    {m}\n" for m in modifiers)


RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (recipe, modifiers that installed plugins must provide)
    "magnitude-50": (_stage(f"MagnitudePruningModifier: {{final_sparsity: 0.5, {_TARGETS}}}"), ("MagnitudePruningModifier",)),
    "magnitude-2:4": (_stage(f"MagnitudePruningModifier: {{mask_structure: '2:4', {_TARGETS}}}"), ("MagnitudePruningModifier",)),
    "wanda-50": (_stage(f"WandaPruningModifier: {{sparsity: 0.5, {_TARGETS}}}"), ("WandaPruningModifier",)),
    "wanda-2:4": (_stage(f"WandaPruningModifier: {{mask_structure: '2:4', {_TARGETS}}}"), ("WandaPruningModifier",)),
    "sparsegpt-50": (_stage(f"SparseGPTModifier: {{sparsity: 0.5, {_TARGETS}}}"), ("SparseGPTModifier",)),
    "sparsegpt-2:4": (_stage(f"SparseGPTModifier: {{mask_structure: '2:4', {_TARGETS}}}"), ("SparseGPTModifier",)),
    "sparsegpt-50-seq": (_stage(f"SparseGPTModifier: {{sparsity: 0.5, true_sequential: true, {_TARGETS}}}"), ("SparseGPTModifier",)),
    "sparsegpt-2:4-seq": (_stage(f"SparseGPTModifier: {{mask_structure: '2:4', true_sequential: true, {_TARGETS}}}"), ("SparseGPTModifier",)),
    "sparsegpt-2:4+rtn-w4a16": ("llmc:sparsegpt_2of4_w4a16", ("SparseGPTModifier",)),
    "sparsegpt-2:4+gptq-w4a16": (
        _stage(
            f"SparseGPTModifier: {{mask_structure: '2:4', {_TARGETS}}}",
            f"GPTQModifier: {{scheme: W4A16, {_TARGETS}}}",
        ),
        ("SparseGPTModifier", "GPTQModifier"),
    ),
}
EXIT_PLUGIN_MISSING = 3


def missing_plugin(modifiers: tuple[str, ...]) -> str | None:
    from llmc import PluginError
    from llmc.plugins import load_registry

    registry = load_registry()
    for modifier in modifiers:
        try:
            registry.resolve(modifier)
        except PluginError as error:
            return str(error)
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--chunks", required=True, help="safetensors file with input_ids [n, seq_len]")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--output", required=True, help="where the compressed checkpoint goes")
    parser.add_argument("--precision", default="auto", help="model dtype for calibration (auto = checkpoint's)")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file

    chunks = load_file(args.chunks)["input_ids"].to(torch.long)  # [n, seq_len]
    n, seq_len = chunks.shape
    info = {"tool": "llmc", "recipe": args.recipe, "precision": args.precision, "samples": int(n), "seq_len": int(seq_len),
            "torch_threads": torch.get_num_threads()}
    recipe, modifiers = RECIPES[args.recipe]
    problem = missing_plugin(modifiers)
    if problem is not None:
        print(f"sparsity_oneshot: {args.recipe!r} cannot run: {problem}", file=sys.stderr)
        print(json.dumps({**info, "error": "plugin-missing", "message": problem}), flush=True)
        return EXIT_PLUGIN_MISSING

    from llmc import oneshot

    dataset = Dataset.from_dict({"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()})
    imported = time.perf_counter()
    result = oneshot(
        model=args.model, dataset=dataset, recipe=recipe, num_calibration_samples=int(n),
        max_seq_length=int(seq_len), output_dir=args.output, overwrite=True, precision=args.precision,
    )
    finished = time.perf_counter()
    rows = [r for r in result.report["modules"] if "sparsity" in r and r.get("module") != "(model)"]
    config = next((r["sparsity_config"] for r in result.report["modules"] if r.get("module") == "(model)"), None)
    print(json.dumps({
        **info,
        "import_s": round(imported - _started, 2),
        "oneshot_s": round(finished - imported, 2),
        "total_s": round(time.perf_counter() - _started, 2),
        "pruned_modules": len(rows),
        "mean_sparsity": round(sum(r["sparsity"] for r in rows) / max(len(rows), 1), 6),
        "sparsity_config": config,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
