"""Solve time of one MoE layer's experts: batched (one call per expert shape) vs one by one.

Run with llmc's venv (needs llmc-gptq and llmc-sparsity installed)::

    python benchmarks/moe_solve.py                        # 64 experts of 256x1024, 3 rounds
    python benchmarks/moe_solve.py --experts 32 --width 512 --hidden 2048 --json out.json

The layer is what ``llmc.moe`` unfuses an MoE block into, under routed calibration: per
expert ``gate_proj`` and ``up_proj`` (``[width, hidden]``, one input group, one ``[hidden,
hidden]`` Hessian) and ``down_proj`` (``[hidden, width]``, its own ``[width, width]``
Hessian), every expert with its own Hessians (``H = 2/N XᵀX`` of seeded inputs, N routed
tokens each). What is timed is the modifiers' own compute of the layer's groups, as
``llmc.distributed.solve_groups`` runs it in one process: ``compute`` per group
(``one-by-one``) against ``compute_batch`` per key (``batched``), for

* ``gptq``: W4A16, group 128, numba sweep (the CPU path);
* ``gptq-torch``: the same with the torch sweep (the GPU path, here on the CPU);
* ``sparsegpt``: unstructured 50 % (numba sweep).

Steps alternate (A B A B, each after waiting for an idle machine, ``benchlib.inprocess``);
medians are printed with the ratio and whether the batched results equal the one-by-one ones.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from benchlib.env import load_average, machine_line, parse, script_parser
from benchlib.inprocess import alternate, medians


class _Expert(torch.nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, width, bias=False)
        self.up_proj = torch.nn.Linear(hidden, width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)


class _Layer(torch.nn.Module):
    def __init__(self, experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(_Expert(hidden, width) for _ in range(experts))


def _groups(layer: _Layer, tokens: int, seed: int = 0) -> list:
    """One input group per expert and input: gate/up, then down (as ``StatisticsPass`` finds them)."""
    from llmc.hessian import HessianAccumulator
    from llmc.statistics import InputGroup

    generator = torch.Generator().manual_seed(seed)
    groups = []
    for index, expert in enumerate(layer.experts):
        for names, module in (
            ([f"layer.experts.{index}.gate_proj", f"layer.experts.{index}.up_proj"], expert.gate_proj),
            ([f"layer.experts.{index}.down_proj"], expert.down_proj),
        ):
            columns = module.in_features
            x = torch.randn(tokens, columns, generator=generator) * (torch.rand(columns, generator=generator) + 0.1)
            statistic = HessianAccumulator.for_linear(module)
            statistic.update(x + 0.5 * torch.roll(x, 1, dims=1))  # correlated neighbours
            statistic.finalize()
            groups.append(InputGroup(len(groups), names, statistic))
    return groups


def _batched(run, groups: list) -> list:
    """``compute_batch`` per batch key, in the groups' order (what ``solve_groups`` does)."""
    by_key: dict = {}
    for group in groups:
        by_key.setdefault(run._batch_key(group), []).append(group)
    results = {}
    for batch in by_key.values():
        results.update(zip((group.index for group in batch), run._compute_batch(batch)))
    return [results[group.index] for group in groups]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__attrs_attrs__"):
        return all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in a.__attrs_attrs__ if not f.name.endswith("seconds"))
    return a == b


def _runs(layer: _Layer) -> dict:
    from llmc_gptq import GPTQModifier
    from llmc_sparsity import SparseGPTModifier

    from llmc.context import RunContext

    model = torch.nn.Module()
    model.layer = layer
    context = RunContext(model=model, device=torch.device("cpu"), layer_names=["layer"])
    runs = {}
    for name, modifier, backend in (
        ("gptq", GPTQModifier(scheme="W4A16"), "numba"),
        ("gptq-torch", GPTQModifier(scheme="W4A16"), "torch"),
        ("sparsegpt", SparseGPTModifier(sparsity=0.5), None),
    ):
        run = modifier.start(context)
        run.llmc_initialize(context)
        if backend is not None:
            run.backend = backend
        runs[name] = run
    return runs


def measure(experts: int, hidden: int, width: int, tokens: int, rounds: int, idle_wait: float) -> dict:
    torch.manual_seed(0)
    layer = _Layer(experts, hidden, width)
    groups = _groups(layer, tokens)
    runs = _runs(layer)
    steps = {}
    equal = {}
    for name, run in runs.items():
        warm = groups[:4]  # compile the kernels, warm the allocator
        _batched(run, warm)
        [run._compute_group(group) for group in warm]
        equal[name] = _equal(_batched(run, groups), [run._compute_group(group) for group in groups])
        steps[f"{name} one-by-one"] = lambda run=run: len([run._compute_group(group) for group in groups])
        steps[f"{name} batched"] = lambda run=run: len(_batched(run, groups))
    load_before = load_average()
    done = alternate(rounds, steps, idle_wait_s=idle_wait)
    median = medians(done)
    return {
        "experts": experts,
        "gate_up": [width, hidden],
        "down": [hidden, width],
        "routed_tokens_per_expert": tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
        "machine_busy_before": {k: [row[k]["busy_before"] for row in done] for k in steps},
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "all_s": {k: [round(row[k]["seconds"], 3) for row in done] for k in steps},
        "speedup": {name: round(median[f"{name} one-by-one"] / median[f"{name} batched"], 2) for name in runs},
        "batched_equals_one_by_one": equal,
    }


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--width", type=int, default=256, help="expert intermediate width (rows of gate/up)")
    parser.add_argument("--hidden", type=int, default=1024, help="model width (columns of gate/up)")
    parser.add_argument("--tokens", type=int, default=512, help="routed tokens per expert")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-wait", type=float, default=30.0, help="seconds to wait for an idle machine per step")
    parser.add_argument("--json", help="write the results here as well")
    args = parse(parser, argv)
    print(machine_line(), flush=True)
    result = measure(args.experts, args.hidden, args.width, args.tokens, args.rounds, args.idle_wait)
    for name, speedup in result["speedup"].items():
        m = result["median_s"]
        print(
            f"{name}: one-by-one {m[f'{name} one-by-one']:.3f}s, batched {m[f'{name} batched']:.3f}s, "
            f"x{speedup} | equal: {result['batched_equals_one_by_one'][name]}",
            flush=True,
        )
    print(f"load {result['load_before']} -> {result['load_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine_cores": os.cpu_count(), **result}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
