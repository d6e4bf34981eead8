"""Held-out perplexity of our pruning recipes on the embedded model (run in llmc's venv).

    python benchmarks/sparsity_quality.py                        # every recipe, 1 run each
    python benchmarks/sparsity_quality.py --recipes sparsegpt-2:4,wanda-2:4 --repeats 3

Complements ``compare.py`` (which runs SparseGPT 50 % / 2:4 and Wanda 50 % side by side with
llm-compressor): the dense model, magnitude pruning, Wanda 2:4 and pruning + W4A16, calibrated on
the same 128 × 512 tokens. Each run is its own process (``sparsity_oneshot.py`` under
``/usr/bin/time -v``); its checkpoint is evaluated by ``common.py ppl`` in another process
(transformers + compressed-tensors). Results go to ``benchmarks/results/<name>.json`` with the
machine load (``/proc/loadavg``) before each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_ROOT,
    EMBEDDED_MODEL,
    calibration_chunks,
    last_json_line,
    load_chunks,
    measure,
    wait_until_idle,
)
from sparsity_oneshot import RECIPES  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def perplexity(model_dir: Path, log: Path) -> float | None:
    command = [sys.executable, str(BENCH_DIR / "common.py"), "ppl", str(model_dir)]
    with open(log, "a") as handle:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "perplexity" in value:
            return float(value["perplexity"])
        if isinstance(value, (int, float)):
            return float(value)
    try:
        return float(done.stdout.strip().split()[-1])
    except (ValueError, IndexError):
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--idle-wait", type=float, default=120.0)
    parser.add_argument("--name", default="sparsity-quality")
    parser.add_argument("--precision", default="auto", help="passed to sparsity_oneshot.py (bfloat16: bf16 calibration)")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; one of {', '.join(RECIPES)}")

    chunks = BENCH_ROOT / f"chunks-{args.samples}x{args.seq_len}.safetensors"
    if not chunks.is_file() or tuple(load_chunks(chunks).shape) != (args.samples, args.seq_len):
        calibration_chunks(args.samples, args.seq_len, chunks)
    run_dir = BENCH_ROOT / "runs" / args.name
    run_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict]] = {"dense": []}
    dense_log = run_dir / "dense-ppl.log"
    results["dense"].append({"perplexity": perplexity(EMBEDDED_MODEL, dense_log)})
    print(f"dense: ppl {results['dense'][0]['perplexity']}", flush=True)
    for repeat in range(args.repeats):
        for recipe in recipes:
            wait_until_idle(args.idle_wait)
            load = load_average()
            slug = recipe.replace(":", "of").replace("+", "_")
            out = BENCH_ROOT / "checkpoints" / args.name / f"{slug}-{repeat}"
            log = run_dir / f"{slug}-{repeat}.log"
            started = time.strftime("%H:%M:%S")
            run = measure(
                [sys.executable, str(BENCH_DIR / "sparsity_oneshot.py"), "--model", str(EMBEDDED_MODEL),
                 "--chunks", str(chunks), "--recipe", recipe, "--output", str(out),
                 "--precision", args.precision],
                log_path=log,
            )
            own = last_json_line(log) or {}
            run.update({"loadavg_before": load, "loadavg_after": load_average(), "started": started, **own})
            if run["returncode"] == 0:
                run["perplexity"] = perplexity(out, log)
            results.setdefault(recipe, []).append(run)
            print(
                f"[{started}] {recipe} #{repeat}: wall {run['wall_s']} s, oneshot {own.get('oneshot_s')} s, "
                f"ppl {run.get('perplexity')}, load {load} -> {run['loadavg_after']}, "
                f"others {run['others_cpu_s']} cpu s", flush=True,
            )

    summary = {}
    for recipe, runs in results.items():
        ok = [r for r in runs if r.get("perplexity") is not None]
        summary[recipe] = {
            "runs": len(runs),
            "perplexity": statistics.median(r["perplexity"] for r in ok) if ok else None,
            "wall_s": statistics.median(r["wall_s"] for r in ok) if ok and "wall_s" in ok[0] else None,
            "oneshot_s": statistics.median(r["oneshot_s"] for r in ok) if ok and "oneshot_s" in ok[0] else None,
            "mean_sparsity": ok[0].get("mean_sparsity") if ok else None,
        }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(
        json.dumps({"name": args.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "samples": args.samples, "seq_len": args.seq_len, "summary": summary, "runs": results},
                   indent=1, default=str) + "\n"
    )
    print("\n| recipe | held-out ppl | wall s | oneshot s | mean sparsity |\n| --- | --- | --- | --- | --- |")
    for recipe, row in summary.items():
        print(f"| {recipe} | {row['perplexity']} | {row['wall_s']} | {row['oneshot_s']} | {row['mean_sparsity']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
