"""The arithmetic one decoder layer of a calibrated compression cannot skip, timed here, beside
each tool's measured time per layer.

Run with llmc's venv, on a quiet machine (it takes seconds)::

    python benchmarks/layer_floor.py --model qwen-coder-0.5b --threads 1 \\
        --results benchmarks/results/qwen-more-fp32-ours.json benchmarks/results/qwen-more-fp32-peer.json

Why: issue 15 asks for our time <= 0.5 x llm-compressor's. Both tools compress layer by layer
the same way: a calibration pass over the dense layer (which may stop at the last target's
input: down_proj's own product is not needed), a propagation pass over the compressed layer,
and for GPTQ and SparseGPT one Hessian product per input group (q/k/v, o, gate/up, down). This
script runs exactly those products with the model's shapes (read from its config) and the
run's token count (samples x seq-len, one sample per forward as in both tools' runs), in
float32, with nothing else: no hooks, norms, rotary, activations, solves, loading or saving.
The sum is a lower bound on a layer's time with these two passes; set beside each tool's CPU
seconds per layer (a real_quality.py results file: user + sys of the whole process, loading and
saving included, over the model's layers) it says whether 0.5 x the peer's time is below what
the scheme itself must compute.

The Hessian products are core's own (``llmc.hessian.HessianAccumulator.update``: the blocks on
and above the diagonal only), the linears ``torch.nn.functional.linear`` with the real shapes
(biases where the config has them), the attention ``scaled_dot_product_attention`` (causal, the
key/value heads repeated as transformers' SDPA path does). Each product is timed ``--rounds``
times over ``--repeat`` samples; the medians are scaled to the run's samples.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib.data import add_model_arguments, model_dir
from benchlib.env import load_average, machine_line, parse, print_json_line, script_parser

# methods whose solve needs a Hessian per input group; the others (Wanda) gather column norms
_HESSIAN_METHODS = ("gptq", "sparsegpt")
# decoder layers of q/k/v/o + gate/up/down, the layout _shapes reads
_DENSE_TYPES = ("llama", "mistral", "qwen2")


def _shapes(config) -> dict[str, tuple[int, int]]:
    """[in, out] of each Linear of one decoder layer (Llama / Qwen2 / Mistral layout)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _median_s(work: Callable[[], None], repeat: int, rounds: int) -> float:
    """Median over ``rounds`` of the seconds ``work`` takes, per call (``repeat`` calls a round)."""
    work()  # warm: first-call allocations and kernel selection stay out of the timing
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            work()
        times.append((time.perf_counter() - start) / repeat)
    return statistics.median(times)


def measure(config, seq_len: int, repeat: int, rounds: int) -> dict[str, float]:
    """Seconds per sample of each product of one layer."""
    import torch
    import torch.nn.functional as F

    from llmc.hessian import HessianAccumulator

    generator = torch.Generator().manual_seed(0)
    bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
    seconds: dict[str, float] = {}
    for name, (cols, rows) in _shapes(config).items():
        x = torch.randn(1, seq_len, cols, generator=generator)
        weight = torch.randn(rows, cols, generator=generator) / cols**0.5
        b = torch.randn(rows, generator=generator) if bias and name[0] in "qkv" else None
        with torch.inference_mode():
            seconds[f"linear:{name}"] = _median_s(lambda x=x, w=weight, b=b: F.linear(x, w, b), repeat, rounds)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    q = torch.randn(1, heads, seq_len, head_dim, generator=generator)
    k = torch.randn(1, kv, seq_len, head_dim, generator=generator)
    v = torch.randn(1, kv, seq_len, head_dim, generator=generator)

    def attention() -> None:
        keys = k.repeat_interleave(heads // kv, dim=1)
        values = v.repeat_interleave(heads // kv, dim=1)
        F.scaled_dot_product_attention(q, keys, values, is_causal=True)

    with torch.inference_mode():
        seconds["attention"] = _median_s(attention, repeat, rounds)
    shapes = _shapes(config)
    for group, module in (("q/k/v", "q_proj"), ("o", "o_proj"), ("gate/up", "gate_proj"), ("down", "down_proj")):
        linear = torch.nn.Linear(shapes[module][0], 1, bias=False)
        accumulator = HessianAccumulator.for_linear(linear)
        x = torch.randn(1, seq_len, shapes[module][0], generator=generator)
        seconds[f"hessian:{group}"] = _median_s(lambda a=accumulator, x=x: a.update(x), repeat, rounds)
    return seconds


def floors(per_sample: dict[str, float], samples: int) -> dict[str, float]:
    """Seconds per layer of each part, for the run's samples."""
    linears = sum(s for key, s in per_sample.items() if key.startswith("linear:"))
    full = linears + per_sample["attention"]
    calibration = full - per_sample["linear:down_proj"]  # stops at down_proj's input
    hessians = sum(s for key, s in per_sample.items() if key.startswith("hessian:"))
    return {
        "full_pass_s": full * samples,
        "calibration_pass_s": calibration * samples,
        "hessians_s": hessians * samples,
        "floor_norms_s": (full + calibration) * samples,
        "floor_hessian_s": (full + calibration + hessians) * samples,
    }


def tool_rows(runs: list[dict], layers: int, floor: dict[str, float]) -> list[dict]:
    """Per run of real_quality.py results files: CPU seconds per layer, against the floor."""
    rows = []
    for run in runs:
        if run.get("returncode") != 0 or "user_s" not in run:
            continue
        method = run["label"].split(":", 1)[1]
        kind = "hessian" if method.startswith(_HESSIAN_METHODS) else "norms"
        per_layer = (run["user_s"] + run["sys_s"]) / layers
        rows.append({
            "label": run["label"],
            "order_seed": run.get("order_seed"),
            "cpu_s_per_layer": round(per_layer, 2),
            "floor_s_per_layer": round(floor[f"floor_{kind}_s"], 2),
            "over_floor": round(per_layer / floor[f"floor_{kind}_s"], 3),
        })
    return rows


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.set_defaults(model="qwen-coder-0.5b")
    parser.add_argument("--repeat", type=int, default=4, help="samples a timing round runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", nargs="*", type=Path, default=[], help="real_quality.py results files")
    parser.add_argument("--json", help="append the result (one JSON line) here")
    args = parse(parser, argv)
    runs = []
    for path in args.results:
        try:
            runs += json.loads(path.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"--results {path}: not a real_quality.py results file ({error})")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir(args.model))
    if config.model_type not in _DENSE_TYPES:
        parser.error(f"--model {args.model} is a {config.model_type} model; the floor knows {', '.join(_DENSE_TYPES)}")
    samples, seq_len = args.samples or 64, args.seq_len or 512
    print(f"{machine_line()}; load {load_average()}; model {args.model}, {samples} x {seq_len} tokens", flush=True)
    per_sample = measure(config, seq_len, args.repeat, args.rounds)
    floor = floors(per_sample, samples)
    flops = 2 * seq_len * sum(cols * rows for cols, rows in _shapes(config).values())
    summary = {
        "model": args.model,
        "samples": samples,
        "seq_len": seq_len,
        "layers": config.num_hidden_layers,
        "load_after": load_average(),
        "per_sample_s": {key: round(s, 5) for key, s in per_sample.items()},
        "linear_gflops": round(flops / sum(s for k, s in per_sample.items() if k.startswith("linear:")) / 1e9, 1),
        **{key: round(s, 2) for key, s in floor.items()},
        "tools": tool_rows(runs, config.num_hidden_layers, floor),
    }
    print_json_line(summary, args.json)
    print(f"\nfloor per layer: {floor['floor_norms_s']:.1f} s (two passes), "
          f"{floor['floor_hessian_s']:.1f} s (two passes + Hessians)")
    for row in summary["tools"]:
        print(f"  {row['label']:<28} order {row['order_seed']!s:<5} {row['cpu_s_per_layer']:7.2f} CPU s/layer"
              f"  = {row['over_floor']:.2f} x its floor")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
