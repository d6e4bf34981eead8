"""llm-compressor's oneshot on the benchmark's model and calibration chunks.

Run with the peer's own venv (it imports llmcompressor, never llmc)::

    .venv-peer/bin/python benchmarks/peer_oneshot.py --model DIR --chunks FILE \
        --recipe gptq-w4a16 --output DIR

Prints, as its last line, a JSON object with its own timings: ``load_s`` (``Oneshot(...)``:
model + tokenizer loading and preprocessing), ``run_s`` (calibration, compression and saving)
and ``oneshot_s`` (both).
"""

from __future__ import annotations

import os

# No hub here: never try the network.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_started = time.perf_counter()

RECIPES = ("gptq-w4a16", "sparsegpt-50", "sparsegpt-2:4", "wanda-50")


def make_modifier(recipe: str):
    """The llm-compressor 0.14 modifier for one of the benchmark's recipe names."""
    if recipe == "gptq-w4a16":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if recipe in ("sparsegpt-50", "sparsegpt-2:4"):
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=0.5,
            mask_structure="2:4" if recipe.endswith("2:4") else "0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
        )
    if recipe == "wanda-50":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(
            sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"]
        )
    raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--chunks", required=True, help="safetensors file with input_ids [n, seq_len]")
    parser.add_argument("--recipe", required=True, choices=RECIPES)
    parser.add_argument("--output", required=True, help="where the compressed checkpoint goes")
    args = parser.parse_args(argv)

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor.entrypoints.oneshot import Oneshot
    from safetensors.torch import load_file

    imported = time.perf_counter()
    chunks = load_file(args.chunks)["input_ids"].to(torch.long)  # [n, seq_len]
    n, seq_len = chunks.shape
    dataset = Dataset.from_dict(
        {"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()}
    )
    modifier = make_modifier(args.recipe)

    started = time.perf_counter()
    run = Oneshot(
        model=args.model,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=int(n),
        max_seq_length=int(seq_len),
        shuffle_calibration_samples=False,
        output_dir=args.output,
    )
    loaded = time.perf_counter()
    run()
    finished = time.perf_counter()
    device = str(next(run.model.parameters()).device)
    print(
        json.dumps(
            {
                "tool": "llmcompressor",
                "version": llmcompressor.__version__,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "recipe": args.recipe,
                "samples": int(n),
                "seq_len": int(seq_len),
                "device": device,
                "import_s": round(imported - _started, 2),
                "load_s": round(loaded - started, 2),
                "run_s": round(finished - loaded, 2),
                "oneshot_s": round(finished - started, 2),
                "total_s": round(finished - _started, 2),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
