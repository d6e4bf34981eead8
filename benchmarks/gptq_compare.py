"""GPTQ W4A16 g128 end to end: llmc (fp32 and bf16 calibration) vs llm-compressor 0.14, and the floor.

Run with llmc's venv::

    python benchmarks/gptq_compare.py --model embedded --repeats 3
    python benchmarks/gptq_compare.py --model wide --repeats 3 --configs floor,gptq,peer

Each configuration runs as its own process under ``/usr/bin/time -v`` (``common.measure``),
interleaved (floor, gptq, gptq-bf16, peer, floor, gptq, ...), each after waiting for an idle
machine. Configurations:

* ``floor``: ``gptq_oneshot.py --floor``, llmc's calibration forwards alone (fp32);
* ``floor-bf16``: the same in bfloat16;
* ``gptq``: ``gptq_oneshot.py``, llmc's ``GPTQModifier(targets=Linear, scheme=W4A16,
  ignore=[lm_head])`` with its defaults (act-order static, no true-sequential), fp32;
* ``gptq-bf16``: the same, calibrated in bfloat16 (Hessians still float32);
* ``floor-autocast`` / ``gptq-autocast``: the fp32 model with ``calibration_precision:
  bfloat16`` (forwards autocast to bf16; weights, Hessians and checkpoint stay fp32);
* ``gptq-trueseq``: the same with ``true_sequential: true``;
* ``peer``: ``peer_oneshot.py`` in ``.venv-peer`` (llm-compressor 0.14, same recipe; its
  default act-order is "static" too), skipped when the peer's venv is missing.

Same model directory and calibration chunks file as compare.py (``/tmp/llmc-bench``). On the
embedded model each checkpoint of the first round is evaluated (held-out perplexity, fp32,
through transformers + compressed-tensors, ``common.py ppl``). Prints a table of medians and
writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH_ROOT,
    EMBEDDED_MODEL,
    REPO_ROOT,
    calibration_chunks,
    last_json_line,
    load_chunks,
    make_wide_llama,
    measure,
    wait_until_idle,
)

HERE = Path(__file__).resolve().parent
PEER_PYTHON = REPO_ROOT / ".venv-peer" / "bin" / "python"
MODELS = {"embedded": (128, 512), "wide": (16, 512)}
CONFIGS = ("floor", "floor-bf16", "floor-autocast", "gptq", "gptq-bf16", "gptq-autocast", "gptq-trueseq", "peer")


def command(config: str, model_dir: Path, chunks: Path, output: Path) -> list[str]:
    ours = [sys.executable, str(HERE / "gptq_oneshot.py"), "--model", str(model_dir), "--chunks", str(chunks)]
    if config == "floor":
        return [*ours, "--floor", "--precision", "float32"]
    if config == "floor-bf16":
        return [*ours, "--floor", "--precision", "bfloat16"]
    if config == "gptq":
        return [*ours, "--output", str(output), "--precision", "float32"]
    if config == "gptq-bf16":
        return [*ours, "--output", str(output), "--precision", "bfloat16"]
    if config == "floor-autocast":
        return [*ours, "--floor", "--precision", "float32", "--calibration-precision", "bfloat16"]
    if config == "gptq-autocast":
        return [*ours, "--output", str(output), "--precision", "float32", "--calibration-precision", "bfloat16"]
    if config == "gptq-trueseq":
        return [*ours, "--output", str(output), "--precision", "float32", "--true-sequential"]
    if config == "peer":
        return [str(PEER_PYTHON), str(HERE / "peer_oneshot.py"), "--model", str(model_dir), "--chunks", str(chunks),
                "--recipe", "gptq-w4a16", "--output", str(output)]
    raise ValueError(config)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--configs", default="floor,gptq,gptq-bf16,peer", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-wait", type=float, default=90.0)
    parser.add_argument("--timeout-min", type=float, default=40.0)
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    for config in configs:
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}")
    if "peer" in configs and not PEER_PYTHON.is_file():
        print(f"no peer venv at {PEER_PYTHON}: reporting llmc only", flush=True)
        configs.remove("peer")
    samples, seq_len = MODELS[args.model]
    model_dir = EMBEDDED_MODEL if args.model == "embedded" else make_wide_llama(BENCH_ROOT / "wide-llama")
    chunks = BENCH_ROOT / f"chunks-{samples}x{seq_len}.safetensors"
    if not chunks.is_file() or tuple(load_chunks(chunks).shape) != (samples, seq_len):
        calibration_chunks(samples, seq_len, chunks)
    evaluate = args.perplexity if args.perplexity is not None else args.model == "embedded"
    run_dir = BENCH_ROOT / "runs" / f"gptq-{args.model}"
    print(f"{args.model}: {model_dir}, calibration {samples} x {seq_len}, {os.cpu_count()} cores; configs {configs}", flush=True)

    runs: list[dict] = []
    for repeat in range(args.repeats):
        for config in configs:
            busy = wait_until_idle(args.idle_wait)
            load = " ".join(open("/proc/loadavg").read().split()[:3])
            output = run_dir / "checkpoints" / f"{config}-{repeat}"
            log = run_dir / "logs" / f"{config}-{repeat}.log"
            started = time.strftime("%H:%M:%S")
            result = measure(command(config, model_dir, chunks, output), log_path=log, timeout_s=args.timeout_min * 60)
            own = last_json_line(log) or {}
            row = {"config": config, "repeat": repeat, "started": started, "busy_before": busy, "load_before": load,
                   **{k: result[k] for k in ("wall_s", "peak_rss_mb", "others_cpu_s", "returncode", "timed_out")},
                   "oneshot_s": own.get("oneshot_s"), "own": own}
            if evaluate and repeat == 0 and not config.startswith("floor") and result["returncode"] == 0:
                ppl_log = run_dir / "logs" / f"{config}-{repeat}-ppl.log"
                measure([sys.executable, str(HERE / "common.py"), "ppl", str(output)], log_path=ppl_log)
                row["perplexity"] = (last_json_line(ppl_log) or {}).get("perplexity")
            print(json.dumps({k: v for k, v in row.items() if k != "own"}), flush=True)
            runs.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps({"model": args.model, "runs": runs}, indent=1))

    summary = {}
    for config in configs:
        done = [r for r in runs if r["config"] == config and r["returncode"] == 0]
        if not done:
            continue
        summary[config] = {
            "n": len(done),
            "wall_s": statistics.median(r["wall_s"] for r in done),
            "oneshot_s": statistics.median(r["oneshot_s"] for r in done if r["oneshot_s"] is not None)
            if any(r["oneshot_s"] is not None for r in done) else None,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in done),
            "perplexity": next((r.get("perplexity") for r in done if r.get("perplexity") is not None), None),
            "others_cpu_s_max": max(r["others_cpu_s"] for r in done),
        }
    peer = summary.get("peer")
    floor = summary.get("floor")
    print(f"\n{'config':14s} {'n':>2s} {'wall s':>8s} {'oneshot s':>10s} {'RSS MB':>8s} {'ppl':>9s} {'wall/peer':>10s} {'wall/floor':>11s}")
    for config, s in summary.items():
        ratio_peer = f"{s['wall_s'] / peer['wall_s']:.3f}" if peer and config != "peer" else "-"
        ratio_floor = f"{s['wall_s'] / floor['wall_s']:.3f}" if floor and config not in ("floor", "peer") else "-"
        ppl = f"{s['perplexity']:.3f}" if s["perplexity"] else "-"
        oneshot = f"{s['oneshot_s']:.2f}" if s["oneshot_s"] is not None else "-"
        print(f"{config:14s} {s['n']:2d} {s['wall_s']:8.2f} {oneshot:>10s} {s['peak_rss_mb']:8.0f} {ppl:>9s} {ratio_peer:>10s} {ratio_floor:>11s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
