"""GPTQ W4A16 on one process against two torchrun ranks, on the same cores (llmc.distributed).

Run with llmc's venv::

    python benchmarks/distributed_scaling.py --model embedded --repeats 3
    python benchmarks/distributed_scaling.py --model wide --repeats 3

The shared driver (``benchlib.driver``) runs the two configurations interleaved, each as its
own process tree under ``/usr/bin/time -v`` (peak RSS is the largest single process: one rank),
and writes ``results/<name>.json`` (default ``distributed-<model>``):

* ``1x2``: ``ours_oneshot.py --recipe gptq-w4a16`` in one process with 2 torch threads;
* ``1x1``: the same with 1 thread, what each rank of ``2x1`` has (the scaling of the solves);
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
from benchlib.env import names, parse, script_parser

_GPTQ = ("--recipe", "gptq-w4a16", "--precision", "float32", "--offload", "none")


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=3, timeout_min=40.0)
    parser.add_argument("--configs", default="1x2,2x1", help="comma-separated, of: 1x2, 1x1, 2x1")
    args = parse(parser, argv)
    chosen = names(parser, args.configs, ("1x2", "1x1", "2x1"), "configs")

    def config(name: str, model_dir: Path, chunks: Path) -> driver.Config:
        ranks, threads = name.split("x")
        plain = driver.ours(name, model_dir, chunks, *_GPTQ, "--threads", threads, rounds=args.repeats)
        if ranks == "1":
            return plain
        torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks)
        return driver.Config(name, (*torchrun, *plain.command[1:]), plain.rounds, writes_checkpoint=True)

    def configs(model_dir: Path, chunks: Path) -> list[driver.Config]:
        return [config(name, model_dir, chunks) for name in chosen]

    return driver.compare(args, configs, default_name=f"distributed-{args.model}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
