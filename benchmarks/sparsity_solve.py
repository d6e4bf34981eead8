"""SparseGPT's per-module solve alone, ours against llm-compressor's, on the same W and H.

    python benchmarks/sparsity_solve.py                       # ours (llmc venv), then the peer
    python benchmarks/sparsity_solve.py --tool ours --shapes 5632x2048

Calibration forwards and Hessian accumulation are left out: both tools get the same float32
weight W [rows, cols] and Hessian H = 2/N XᵀX (from seeded correlated inputs, N = 8192 tokens)
and must return the pruned weight: damping, inverse Cholesky, mask selection and the blocked
column sweep (block 128, damping 0.01). Ours is ``llmc.hessian.inverse_cholesky_upper`` +
``llmc_sparsity.sparsegpt.sparsegpt_`` (numba sweep); the peer's is llm-compressor 0.14's
``sparsify_weight``, run in ``.venv-peer`` (``--tool peer``; it never imports llmc). Reports the
median of ``--repeats`` timings per shape and structure, and the relative layer-output error
‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² of each result. With ``--tool both`` the shared driver
(``benchlib.driver.interleave``) runs one process per tool, shape and structure, A B A B, each
after waiting for an idle machine; without the peer's venv only ours is run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib.driver import Config, interleave
from benchlib.env import BENCH_ROOT, PEER_PYTHON, RESULTS_DIR, parse, script_parser

STRUCTURES = {"50": (0.5, 0, 0), "2:4": (0.5, 2, 4)}


def problem(rows: int, cols: int, tokens: int = 8192, seed: int = 0):
    """Seeded W [rows, cols] and H [cols, cols] = 2/N XᵀX, X correlated with uneven scales."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols, cols // 4, generator=generator) / (cols // 4) ** 0.5
    X = torch.randn(tokens, cols // 4, generator=generator) @ basis.T  # low-rank part: correlations
    X += 0.3 * torch.randn(tokens, cols, generator=generator)
    X *= torch.rand(cols, generator=generator) + 0.2
    H = 2.0 / tokens * X.T @ X
    W = torch.randn(rows, cols, generator=generator) / cols**0.5
    return X, W, H


def solve_ours(W: torch.Tensor, H: torch.Tensor, sparsity: float, keep_n: int, group_m: int) -> torch.Tensor:
    from llmc_sparsity.sparsegpt import sparsegpt_

    from llmc.hessian import inverse_cholesky_upper, zero_dead_columns_

    W = W.clone()
    H = H.clone()
    zero_dead_columns_(H, W)
    U, _ = inverse_cholesky_upper(H, 0.01, module_name="bench")
    sparsegpt_(W, U, sparsity=sparsity, keep_n=keep_n, group_m=group_m, block_size=128)
    return W


def solve_peer(W: torch.Tensor, H: torch.Tensor, sparsity: float, keep_n: int, group_m: int) -> torch.Tensor:
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    module = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        module.weight.copy_(W)
    # their "N:M" prunes N of every M; for 2:4 the two readings agree
    _, pruned = sparsify_weight(
        module, {module: H.clone()}, sparsity, keep_n, group_m, 128, 0.01, False
    )
    return pruned


def run_tool(tool: str, shapes: list[tuple[int, int]], structures: list[str], repeats: int) -> list[dict]:
    solve = solve_ours if tool == "ours" else solve_peer
    rows_out = []
    for rows, cols in shapes:
        X, W, H = problem(rows, cols)
        for name in structures:
            sparsity, keep_n, group_m = STRUCTURES[name]
            times = []
            pruned = None
            for _ in range(repeats):
                started = time.perf_counter()
                with torch.no_grad():
                    pruned = solve(W, H, sparsity, keep_n, group_m)
                times.append(time.perf_counter() - started)
            error = float(((X @ (W - pruned).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
            rows_out.append({
                "tool": tool, "shape": f"{rows}x{cols}", "structure": name,
                "median_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times],
                "output_error": round(error, 6), "sparsity": round(float((pruned == 0).float().mean()), 4),
            })
            print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--tool", choices=("ours", "peer", "both"), default="both")
    parser.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632", help="rows x cols, comma-separated")
    parser.add_argument("--structures", default="50,2:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-wait", type=float, default=60.0, help="--tool both: seconds to wait for an idle machine per run")
    args = parse(parser, argv)
    shapes = args.shapes.split(",")
    structures = args.structures.split(",")
    if args.tool != "both":
        run_tool(args.tool, [tuple(int(v) for v in s.split("x")) for s in shapes], structures, args.repeats)
        return 0
    tools = {"ours": sys.executable, **({"peer": str(PEER_PYTHON)} if PEER_PYTHON.exists() else {})}
    configs = [
        Config(
            f"{tool}:{shape}:{structure}",
            (python, str(Path(__file__).resolve()), "--tool", tool, "--shapes", shape, "--structures", structure, "--repeats", str(args.repeats)),
            rounds=1,
        )
        for shape in shapes
        for structure in structures
        for tool, python in tools.items()
    ]
    runs = interleave(configs, work=BENCH_ROOT / "runs" / "sparsity-solve", idle_wait_s=args.idle_wait)
    results = [{**run["internal"], "loadavg_before": run["loadavg_before"]} for run in runs if run["internal"]]

    def find(tool: str, shape: str, structure: str) -> dict | None:
        return next((r for r in results if (r["tool"], r["shape"], r["structure"]) == (tool, shape, structure)), None)

    print("\n| shape | structure | ours s | peer s | ours/peer | ours error | peer error | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        for structure in structures:
            ours, peer = find("ours", shape, structure), find("peer", shape, structure)
            if ours is None:
                continue
            ratio = f"{ours['median_s'] / peer['median_s']:.3f}" if peer else "-"
            print(f"| {shape} | {structure} | {ours['median_s']} | {peer['median_s'] if peer else '-'} | {ratio} "
                  f"| {ours['output_error']} | {peer['output_error'] if peer else '-'} | {ours['loadavg_before']} |")
    out = RESULTS_DIR / "sparsity-solve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
