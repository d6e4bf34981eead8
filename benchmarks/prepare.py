"""Build (once) a benchmark model and its calibration chunks, and print where they are.

    python benchmarks/prepare.py --model wide            # /tmp/llmc-bench/wide-llama, 16 x 512
    python benchmarks/prepare.py --model embedded --samples 32 --seq-len 256

For running ``ours_oneshot.py`` or ``peer_oneshot.py`` alone (profiling), with the very files
the drivers use. Prints one JSON line: ``{"model": DIR, "chunks": FILE}``.
"""

from __future__ import annotations

import json
import sys

from benchlib.data import add_model_arguments, prepare
from benchlib.env import parse, script_parser


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    args = parse(parser, argv)
    model_dir, chunks = prepare(args.model, args.samples, args.seq_len)
    print(json.dumps({"model": str(model_dir), "chunks": str(chunks)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
