"""Held-out perplexity of a checkpoint, in its own process (run in llmc's venv).

    python benchmarks/perplexity.py MODEL_DIR [--max-chunks N]

llmc's held-out split ``llmc:stdlib-docs-heldout`` (never used for calibration), fp32,
non-overlapping chunks of 512 tokens. Compressed-tensors checkpoints load through transformers +
compressed-tensors, the same reader for every tool's output. Prints one JSON line:
``{"perplexity": ..., "eval_s": ...}``; the drivers run it after each run that wrote a checkpoint.
"""

from __future__ import annotations

import json
import sys
import time

from benchlib.env import parse, script_parser

EVAL_SEQ_LEN = 512


def heldout_perplexity(
    model_dir: str, max_chunks: int | None = None, seq_len: int = EVAL_SEQ_LEN
) -> float:
    """Perplexity of the checkpoint in ``model_dir`` on the held-out split, fp32."""
    from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

    model, tokenizer = load_model_for_eval(model_dir, precision="float32", device="cpu")
    return perplexity(model, heldout_token_ids(tokenizer), seq_len=seq_len, max_chunks=max_chunks)


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("model_dir")
    parser.add_argument(
        "--max-chunks", type=int, help="held-out chunks of 512 to use (default: all)"
    )
    args = parse(parser, argv)
    started = time.perf_counter()
    value = heldout_perplexity(args.model_dir, args.max_chunks)
    print(
        json.dumps({"perplexity": value, "eval_s": round(time.perf_counter() - started, 2)}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
