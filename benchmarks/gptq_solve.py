"""Time of one GPTQ solve: numba sweep vs the torch reference sweep, against one dense product.

Run with llmc's venv (needs llmc-gptq installed)::

    python benchmarks/gptq_solve.py                      # 4096x4096 and 11008x4096, 3 rounds
    python benchmarks/gptq_solve.py --shapes 4096x4096 --rounds 5 --json out.json

For each weight shape ``[rows, cols]`` the Hessian is fixed (``H = 2/N XᵀX`` of seeded,
correlated inputs, N = 2 cols) and every round measures, in this order (A B A B ..., each step
after waiting for an idle machine, ``benchlib.inprocess.alternate``):

* ``matmul``: one dense product of the same size, ``W @ H`` (``[rows, cols] x [cols, cols]``);
* ``prepare``: dead inputs, act-order permutation, damping and the inverse Cholesky factor
  (``llmc_gptq.gptq.prepare_hessian``, core's ``llmc.hessian.inverse_cholesky_upper``);
* ``numba``: the sweep with the numba kernel (blocks of 128, group-128 parameters computed as the sweep reaches them; with and without act-order);
* ``torch``: the same sweep with the torch reference kernel.

A solve is ``prepare + sweep``. Prints a table of medians and the ratios the issue asks for
(numba / torch solve; numba solve / matmul), with the machine's load before and after.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from benchlib.env import load_average, machine_line, parse, script_parser
from benchlib.inprocess import alternate, medians


def _discarding(fn):
    """The step without its result: ``alternate`` keeps what a step returns, and these are large."""

    def step() -> None:
        fn()

    return step


def _problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator) * 0.02
    scales = torch.rand(cols, generator=generator) + 0.1
    X = torch.randn(2 * cols, cols, generator=generator) * scales
    X = X + 0.5 * torch.roll(X, 1, dims=1)  # correlated neighbours
    return W, 2.0 / X.shape[0] * X.T @ X


def measure(rows: int, cols: int, rounds: int, idle_wait: float = 60.0, actorder: bool = True) -> dict[str, object]:
    from llmc_gptq.gptq import gptq_quantize_prepared, prepare_hessian

    W, H = _problem(rows, cols)
    options = dict(num_bits=4, symmetric=True, strategy="group", group_size=128, block_size=128)
    prepared = prepare_hessian(H, dampening_frac=0.01, actorder=actorder)
    # compile / warm up both kernels on a slice
    gptq_quantize_prepared(W[:64], prepared, backend="numba", **options)
    gptq_quantize_prepared(W[:64], prepared, backend="torch", **options)
    steps = {
        "matmul": _discarding(lambda: W @ H),
        "prepare": _discarding(lambda: prepare_hessian(H, dampening_frac=0.01, actorder=actorder)),
        "numba": _discarding(lambda: gptq_quantize_prepared(W, prepared, backend="numba", **options)),
        "torch": _discarding(lambda: gptq_quantize_prepared(W, prepared, backend="torch", **options)),
    }
    load_before = load_average()
    done = alternate(rounds, steps, idle_wait_s=idle_wait)
    median = medians(done)
    numba_solve = median["prepare"] + median["numba"]
    torch_solve = median["prepare"] + median["torch"]
    return {
        "shape": [rows, cols],
        "actorder": actorder,
        "rounds": rounds,
        "load_before": load_before,
        "load_after": load_average(),
        "machine_busy_before": {k: [row[k]["busy_before"] for row in done] for k in steps},
        "median_s": {k: round(v, 4) for k, v in median.items()},
        "all_s": {k: [round(row[k]["seconds"], 4) for row in done] for k in steps},
        "numba_solve_s": round(numba_solve, 4),
        "torch_solve_s": round(torch_solve, 4),
        "sweep_ratio_numba_over_torch": round(median["numba"] / median["torch"], 3),
        "solve_ratio_numba_over_torch": round(numba_solve / torch_solve, 3),
        "numba_solve_over_matmul": round(numba_solve / median["matmul"], 3),
    }


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated ROWSxCOLS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here as well")
    parser.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait for an idle machine per step")
    parser.add_argument("--actorder", default="both", choices=["both", "on", "off"], help="sweep order (default: both)")
    args = parse(parser, argv)
    import numba

    print(f"{machine_line()}, numba {numba.__version__}", flush=True)
    results = []
    orders = {"both": (True, False), "on": (True,), "off": (False,)}[args.actorder]
    for shape, actorder in [(shape, order) for shape in args.shapes.split(",") for order in orders]:
        rows, cols = (int(x) for x in shape.lower().split("x"))
        result = measure(rows, cols, args.rounds, args.idle_wait, actorder)
        results.append(result)
        m = result["median_s"]
        print(
            f"{rows}x{cols} actorder={actorder}: matmul {m['matmul']:.3f}s | prepare {m['prepare']:.3f}s | "
            f"sweep numba {m['numba']:.3f}s, torch {m['torch']:.3f}s | solve numba {result['numba_solve_s']:.3f}s, "
            f"torch {result['torch_solve_s']:.3f}s | numba/torch sweep {result['sweep_ratio_numba_over_torch']}, "
            f"solve {result['solve_ratio_numba_over_torch']} | numba solve/matmul {result['numba_solve_over_matmul']} "
            f"| load {result['load_before']} -> {result['load_after']}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine_cores": os.cpu_count(), "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
