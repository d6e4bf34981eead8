"""GPTQ W4A16 on one process against two torchrun ranks, on the same cores (llmc.distributed).

Run with llmc's venv::

    python benchmarks/distributed_scaling.py --model embedded --repeats 3
    python benchmarks/distributed_scaling.py --model wide --repeats 3

The shared driver (``benchlib.driver``) runs the two configurations interleaved, each as its
own process tree under ``/usr/bin/time -v`` (peak RSS is the largest single process: one rank),
and writes ``results/<name>.json`` (default ``distributed-<model>``):

* ``1x2``: ``ours_oneshot.py --recipe gptq-w4a16`` in one process with 2 torch threads;
* ``2x1``: the same under ``torchrun --nproc-per-node 2``, 1 thread per rank: each rank
  calibrates on half of the samples, the Hessians are summed, each layer's solves are shared
  out by cost and the results broadcast.

Each run's report gives ``solve_s`` (the layers' ``solve_seconds`` summed: the modifiers' work
at the end of each layer, GPTQ's solves and the reduction of the Hessians), the figure the
work-parallel solves should halve. Perplexity is evaluated on the embedded model only (the
wide one is random).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import driver
from benchlib.env import parse, script_parser

_GPTQ = ("--recipe", "gptq-w4a16", "--precision", "float32", "--offload", "none")


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=3, timeout_min=40.0)
    args = parse(parser, argv)

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        one = driver.ours("1x2", model_dir, chunks, *_GPTQ, "--threads", "2", rounds=args.repeats)
        two = driver.ours("2x1", model_dir, chunks, *_GPTQ, "--threads", "1", rounds=args.repeats)
        torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2")
        return [one, driver.Config(two.label, (*torchrun, *two.command[1:]), two.rounds, writes_checkpoint=True)]

    return driver.compare(args, configs, default_name=f"distributed-{args.model}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
