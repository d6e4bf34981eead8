"""GPTQ W4A16 g128 end to end: llmc (fp32, bf16, autocast) vs llm-compressor 0.14, and the floor.

Run with llmc's venv::

    python benchmarks/gptq_compare.py --model embedded --repeats 3
    python benchmarks/gptq_compare.py --model wide --repeats 3 --configs floor,gptq,peer

The shared driver (``benchlib.driver``) runs each configuration as its own process under
``/usr/bin/time -v``, interleaved (floor, gptq, gptq-bf16, peer, floor, gptq, ...), each after
waiting for an idle machine, and writes ``results/<name>.json`` (default ``gptq-<model>``).
Configurations (``ours_oneshot.py`` unless said):

* ``floor``: ``--floor``, llmc's calibration forwards alone (fp32); ``floor-bf16``: the same
  with the model in bfloat16;
* ``gptq``: ``--recipe gptq-w4a16``, llmc's ``GPTQModifier(targets=Linear, scheme=W4A16,
  ignore=[lm_head])`` with its defaults (act-order static, no true-sequential), fp32;
* ``gptq-bf16``: the same, model in bfloat16 (Hessians still float32);
* ``floor-autocast`` / ``gptq-autocast``: the fp32 model with ``calibration_precision:
  bfloat16`` (forwards autocast to bf16; weights, Hessians and checkpoint stay fp32);
* ``gptq-trueseq``: ``gptq`` with ``true_sequential: true``;
* ``peer``: ``peer_oneshot.py`` in ``.venv-peer`` (llm-compressor 0.14, same recipe; its
  default act-order is "static" too), left out when the peer's venv is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import driver
from benchlib.env import names, parse, script_parser

_FP32 = ("--precision", "float32")
_GPTQ = ("--recipe", "gptq-w4a16")
_AUTOCAST = ("--calibration-precision", "bfloat16")
CONFIGS: dict[str, tuple[str, ...]] = {
    "floor": ("--floor", *_FP32),
    "floor-bf16": ("--floor", "--precision", "bfloat16"),
    "floor-autocast": ("--floor", *_FP32, *_AUTOCAST),
    "gptq": (*_GPTQ, *_FP32),
    "gptq-bf16": (*_GPTQ, "--precision", "bfloat16"),
    "gptq-autocast": (*_GPTQ, *_FP32, *_AUTOCAST),
    "gptq-trueseq": (*_GPTQ, *_FP32, "--true-sequential"),
    "peer": (),
}


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=3, timeout_min=40.0)
    parser.add_argument(
        "--configs",
        default="floor,gptq,gptq-bf16,peer",
        help=f"comma-separated, of: {', '.join(CONFIGS)}",
    )
    args = parse(parser, argv)
    chosen = names(parser, args.configs, CONFIGS, "configs")

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        return [
            driver.peer(name, model_dir, chunks, "gptq-w4a16", rounds=args.repeats)
            if name == "peer"
            else driver.ours(name, model_dir, chunks, *CONFIGS[name], rounds=args.repeats)
            for name in chosen
        ]

    return driver.compare(args, configs, default_name=f"gptq-{args.model}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
