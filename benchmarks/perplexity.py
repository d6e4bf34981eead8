"""Held-out perplexity of a checkpoint, in its own process (run in llmc's venv).

    python benchmarks/perplexity.py MODEL_DIR [--max-chunks N]

llmc's held-out split ``llmc:stdlib-docs-heldout`` (never used for calibration), fp32,
non-overlapping chunks of 512 tokens. Compressed-tensors checkpoints load through transformers +
compressed-tensors, the same reader for every tool's output. Prints one JSON line:
``{"perplexity": ..., "eval_s": ..., "zero_share": ..., "two_four_share": ...}``; the drivers run
it after each run that wrote a checkpoint.

The two shares are of the dequantized Linear weights the checkpoint holds (``lm_head`` left
out): the fraction that is exactly zero, and the fraction of groups of four consecutive inputs
with at least two zeros (1.0 for a 2:4 checkpoint). A recipe that prunes and then quantizes is
only comparable to another one whose checkpoint is as sparse: llm-compressor 0.14's GPTQ
refills the zeros its SparseGPT left (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
import time

from benchlib.env import parse, script_parser

EVAL_SEQ_LEN = 512


def heldout_perplexity(
    model_dir: str, max_chunks: int | None = None, seq_len: int = EVAL_SEQ_LEN
) -> dict[str, float]:
    """Perplexity of the checkpoint in ``model_dir`` on the held-out split, fp32, and its sparsity."""
    from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

    model, tokenizer = load_model_for_eval(model_dir, precision="float32", device="cpu")
    value = perplexity(model, heldout_token_ids(tokenizer), seq_len=seq_len, max_chunks=max_chunks)
    return {"perplexity": value, **weight_sparsity(model)}


def weight_sparsity(model) -> dict[str, float]:
    """``zero_share`` and ``two_four_share`` of ``model``'s Linear weights but ``lm_head``'s."""
    import torch

    zeros = weights = groups = two_four = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        is_zero = module.weight.detach() == 0
        zeros += int(is_zero.sum())
        weights += is_zero.numel()
        if is_zero.shape[-1] % 4 == 0:
            per_group = is_zero.reshape(-1, 4).sum(dim=1)
            groups += per_group.numel()
            two_four += int((per_group >= 2).sum())
    return {
        "zero_share": round(zeros / max(weights, 1), 5),
        "two_four_share": round(two_four / max(groups, 1), 5),
    }


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("model_dir")
    parser.add_argument(
        "--max-chunks", type=int, help="held-out chunks of 512 to use (default: all)"
    )
    args = parse(parser, argv)
    started = time.perf_counter()
    values = heldout_perplexity(args.model_dir, args.max_chunks)
    values["eval_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(values), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
