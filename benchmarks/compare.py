"""llmc vs llm-compressor, side by side on this machine (run in llmc's venv).

    python benchmarks/compare.py --model embedded --recipe gptq-w4a16
    python benchmarks/compare.py --model wide --ours-recipe floor,rtn-w4a16 --peer-recipe gptq-w4a16

Prepares the model and the calibration chunks once, then runs each configuration as its own
process under ``/usr/bin/time -v``, interleaved (ours, peer, ours, peer, ...), and reports
medians of wall time, peak RSS and (embedded model) held-out perplexity of each checkpoint, with
the ratio ours / peer. Without the peer's venv (``.venv-peer``) only our numbers are reported.
Generated models, checkpoints and logs stay under ``/tmp/llmc-bench``; the results (and a
compacted copy of every run's log) go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PEER_PYTHON = REPO_ROOT / ".venv-peer" / "bin" / "python"
OURS_SCRIPT = BENCH_DIR / "ours_oneshot.py"
PEER_SCRIPT = BENCH_DIR / "peer_oneshot.py"
COMMON_SCRIPT = BENCH_DIR / "common.py"

OURS_RECIPES = ("floor", "rtn-w4a16", "gptq-w4a16", "sparsegpt-50", "sparsegpt-2:4", "wanda-50")
PEER_RECIPES = ("gptq-w4a16", "sparsegpt-50", "sparsegpt-2:4", "wanda-50")
MODELS: dict[str, dict[str, Any]] = {
    # random weights for "wide": its perplexity means nothing, so it is not evaluated
    "embedded": {"samples": 128, "seq_len": 512, "perplexity": True},
    "wide": {"samples": 16, "seq_len": 512, "perplexity": False},
}
EXIT_PLUGIN_MISSING = 3


# --- preparation ---------------------------------------------------------------------------------


def prepare(kind: str, samples: int, seq_len: int) -> tuple[Path, Path]:
    """The model directory and the calibration chunks file, built once and reused."""
    if kind == "embedded":
        model_dir = EMBEDDED_MODEL
    else:
        model_dir = make_wide_llama(BENCH_ROOT / "wide-llama")
    chunks_file = BENCH_ROOT / f"chunks-{samples}x{seq_len}.safetensors"
    if not chunks_file.is_file() or tuple(load_chunks(chunks_file).shape) != (samples, seq_len):
        calibration_chunks(samples, seq_len, chunks_file)
    # Read the weights once so the first run does not pay for the disk alone.
    for file in model_dir.glob("*.safetensors"):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass
    return model_dir, chunks_file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_facts(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "dtype",
    )
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"path": str(model_dir), **{k: config.get(k) for k in keys}, "safetensors_mb": round(size / 2**20, 1)}


def peer_versions() -> dict[str, str] | None:
    """Versions in the peer's venv, or None when it is not set up."""
    if not PEER_PYTHON.is_file():
        return None
    code = (
        "import json, importlib.metadata as m\n"
        "import llmcompressor\n"
        "print(json.dumps({p: m.version(p) for p in "
        "('llmcompressor', 'compressed-tensors', 'torch', 'transformers', 'datasets', 'accelerate')}))"
    )
    done = subprocess.run([str(PEER_PYTHON), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"the peer venv does not import llmcompressor:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("llmc-core", "llmc-gptq", "llmc-sparsity", "compressed-tensors", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    rev = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    versions["git"] = rev.stdout.strip()
    return versions


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
    }


# --- runs ----------------------------------------------------------------------------------------


def _compact_log(source: Path, target: Path) -> None:
    """Copy a log keeping only the last state of each progress bar (tqdm rewrites with CR)."""
    text = source.read_text(errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if "\r" in line else line for line in text.split("\n")]
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in lines]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines))


def one_run(
    *,
    tool: str,
    recipe: str,
    repeat: int,
    model_dir: Path,
    chunks_file: Path,
    work: Path,
    evaluate: bool,
    timeout_s: float,
    idle_wait_s: float,
) -> dict[str, Any]:
    label = f"{tool}:{recipe}"
    slug = f"{tool}-{recipe.replace(':', '_')}-{repeat}"
    output = work / "checkpoints" / slug
    log = work / "logs" / f"{slug}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        shutil.rmtree(output)
    if tool == "ours":
        cmd = [sys.executable, str(OURS_SCRIPT), "--model", str(model_dir), "--chunks", str(chunks_file)]
        base, _, precision = recipe.partition("@")  # "sparsegpt-2:4@bfloat16": calibration precision
        cmd += ["--floor"] if base == "floor" else ["--recipe", base, "--output", str(output)]
        if precision:
            cmd += ["--calibration-precision", precision]
    else:
        cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--model", str(model_dir), "--chunks", str(chunks_file)]
        cmd += ["--recipe", recipe, "--output", str(output)]
    busy_before = wait_until_idle(idle_wait_s) if idle_wait_s > 0 else None
    print(f"[{time.strftime('%H:%M:%S')}] {label} #{repeat} (machine busy {busy_before}) ...", flush=True)
    result = measure(cmd, log_path=log, timeout_s=timeout_s, cwd=work)
    result.update(label=label, tool=tool, recipe=recipe, repeat=repeat, busy_before=busy_before)
    result["internal"] = last_json_line(log)
    if result["timed_out"]:
        print(f"    timed out after {timeout_s / 60:.0f} min; see {log}", flush=True)
    elif result["returncode"] == EXIT_PLUGIN_MISSING and tool == "ours":
        result["skipped"] = (result["internal"] or {}).get("message", "plugin missing")
        print(f"    skipped: {result['skipped']}", flush=True)
    elif result["returncode"] != 0:
        print(f"    FAILED (exit {result['returncode']}); see {log}", flush=True)
    else:
        print(
            f"    {result['wall_s']:.1f} s, {result['peak_rss_mb']:.0f} MB "
            f"(others used {result['others_cpu_s']} CPU s meanwhile)",
            flush=True,
        )
    ok = result["returncode"] == 0 and not result["timed_out"]
    if ok and evaluate and recipe != "floor":
        result["perplexity"], result["eval"] = evaluate_checkpoint(output, work / "logs" / f"{slug}.ppl.log")
        print(f"    perplexity {result['perplexity']}", flush=True)
    return result


def evaluate_checkpoint(model_dir: Path, log: Path) -> tuple[float | None, dict[str, Any]]:
    """Held-out perplexity, in its own process (llmc's venv: transformers + compressed-tensors)."""
    cmd = [sys.executable, str(COMMON_SCRIPT), "ppl", str(model_dir)]
    result = measure(cmd, log_path=log)
    value = (last_json_line(log) or {}).get("perplexity")
    return value, {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"], "returncode": result["returncode"]}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


QUIET_SHARE = 0.10


def is_quiet(run: dict[str, Any]) -> bool:
    """Whether other processes used at most 10% of the machine's CPU capacity during the run."""
    others = run.get("others_cpu_s")
    return others is not None and others <= QUIET_SHARE * run["wall_s"] * (os.cpu_count() or 1)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        good = [r for r in runs if r["label"] == label and r["returncode"] == 0 and not r["timed_out"]]
        internal = [(r.get("internal") or {}).get("oneshot_s") for r in good]
        quiet = [r for r in good if is_quiet(r)]
        summary[label] = {
            "runs": len(good),
            "quiet_runs": len(quiet),
            "quiet_wall_s": _median([r["wall_s"] for r in quiet]),
            "quiet_oneshot_s": _median([(r.get("internal") or {}).get("oneshot_s") for r in quiet]),
            "failed": sum(1 for r in runs if r["label"] == label) - len(good),
            "wall_s": _median([r["wall_s"] for r in good]),
            "peak_rss_mb": _median([r["peak_rss_mb"] for r in good]),
            "cpu_s": _median([(r["user_s"] or 0) + (r["sys_s"] or 0) for r in good]),
            "others_cpu_s": _median([r.get("others_cpu_s") for r in good]),
            "oneshot_s": _median(internal),
            "perplexity": _median([r.get("perplexity") for r in good]),
        }
    return summary


def ratios(summary: dict[str, dict[str, Any]], peer_label: str | None) -> dict[str, dict[str, Any]]:
    if peer_label is None or not summary.get(peer_label, {}).get("runs"):
        return {}
    peer = summary[peer_label]
    out = {}
    for label, row in summary.items():
        if not label.startswith("ours:") or not row["runs"]:
            continue
        out[label] = {
            key: round(row[key] / peer[key], 3) if row[key] and peer[key] else None
            for key in ("wall_s", "quiet_wall_s", "peak_rss_mb", "cpu_s", "oneshot_s", "quiet_oneshot_s", "perplexity")
        }
    return out


def print_table(summary: dict[str, Any], ratio: dict[str, Any], baseline_ppl: float | None) -> None:
    columns = [
        ("run", 24), ("n", 3), ("quiet", 6), ("wall s", 9), ("quiet wall s", 13), ("oneshot s", 10),
        ("peak RSS MB", 12), ("ppl", 9), ("others cpu s", 13), ("wall/peer", 10), ("quiet/peer", 11),
        ("RSS/peer", 9),
    ]
    header = "".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    print(header)
    print("-" * len(header))

    def fmt(value: Any, width: int, digits: int) -> str:
        if isinstance(value, (int, float)):
            return format(value, f"{width}.{digits}f")
        return "-".rjust(width)

    for label, row in summary.items():
        r = ratio.get(label, {})
        print(
            f"{label:<24}{row['runs']:>3}{row['quiet_runs']:>6}{fmt(row['wall_s'], 9, 1)}"
            f"{fmt(row['quiet_wall_s'], 13, 1)}{fmt(row['oneshot_s'], 10, 1)}{fmt(row['peak_rss_mb'], 12, 0)}"
            f"{fmt(row['perplexity'], 9, 3)}{fmt(row['others_cpu_s'], 13, 1)}{fmt(r.get('wall_s'), 10, 3)}"
            f"{fmt(r.get('quiet_wall_s'), 11, 3)}{fmt(r.get('peak_rss_mb'), 9, 3)}"
        )
    if baseline_ppl is not None:
        print(f"{'uncompressed model':<24}{'':>{3 + 6 + 9 + 13 + 10 + 12}}{baseline_ppl:>9.3f}")
    print(
        f"(medians; 'quiet' runs are those during which other processes used at most "
        f"{QUIET_SHARE:.0%} of the machine's CPU)"
    )


def write_results(
    *,
    name: str,
    kind: str,
    model_dir: Path,
    chunks_file: Path,
    ours: list[str],
    peer_recipe: str | None,
    versions_peer: dict[str, str] | None,
    baseline_ppl: float | None,
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Summarize the runs so far and write ``results/<name>.json`` (plus compacted logs)."""
    summary = summarize(runs)
    ratio = ratios(summary, f"peer:{peer_recipe}" if peer_recipe else None)
    logs_dir = RESULTS_DIR / name / "logs"
    for run in runs:
        log = Path(run["log"])
        if log.is_file():
            _compact_log(log, logs_dir / log.name)
            run["log_copy"] = str((logs_dir / log.name).relative_to(REPO_ROOT))
    chunks = load_chunks(chunks_file)
    results = {
        "name": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "model": {"kind": kind, **model_facts(model_dir)},
        "calibration": {
            "samples": int(chunks.shape[0]),
            "seq_len": int(chunks.shape[1]),
            "file": str(chunks_file),
            "sha256": _sha256(chunks_file),
        },
        "versions": {"ours": our_versions(), "peer": versions_peer},
        "ours_recipes": ours,
        "peer_recipe": peer_recipe,
        "baseline_perplexity": baseline_ppl,
        "quiet_rule": f"others_cpu_s <= {QUIET_SHARE} * wall_s * cores",
        "summary": summary,
        "ratios_ours_over_peer": ratio,
        "runs": runs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--recipe", help="recipe for both tools (sets --ours-recipe and --peer-recipe)")
    parser.add_argument("--ours-recipe", help=f"comma-separated, of: {', '.join(OURS_RECIPES)}; append @bfloat16 to calibrate in bf16 autocast")
    parser.add_argument("--peer-recipe", help=f"one of: {', '.join(PEER_RECIPES)}, or 'none'")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each of our configurations")
    parser.add_argument("--peer-repeats", type=int, help="runs of the peer (default: --repeats)")
    parser.add_argument("--samples", type=int, help="calibration samples (default: per model)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default: per model)")
    parser.add_argument("--timeout-min", type=float, default=25.0, help="stop a run after this long")
    parser.add_argument(
        "--idle-wait", type=float, default=120.0,
        help="before each run, wait up to this many seconds for other processes to leave the cores idle",
    )
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, help="evaluate checkpoints (default: embedded only)")
    parser.add_argument("--name", help="results name (default: from model and recipes)")
    args = parser.parse_args(argv)

    ours = (args.ours_recipe or args.recipe or "").split(",")
    ours = [r for r in ours if r]
    peer_recipe = args.peer_recipe or (args.recipe if args.recipe in PEER_RECIPES else None)
    if peer_recipe == "none":
        peer_recipe = None
    for r in ours:
        if r.partition("@")[0] not in OURS_RECIPES or r.partition("@")[2] not in ("", "bfloat16", "float16"):
            parser.error(f"unknown recipe {r!r} for ours; one of {', '.join(OURS_RECIPES)}")
    if peer_recipe is not None and peer_recipe not in PEER_RECIPES:
        parser.error(f"unknown recipe {peer_recipe!r} for the peer; one of {', '.join(PEER_RECIPES)}")
    if not ours and peer_recipe is None:
        parser.error("nothing to run: give --recipe, --ours-recipe or --peer-recipe")

    spec = MODELS[args.model]
    samples = args.samples or spec["samples"]
    seq_len = args.seq_len or spec["seq_len"]
    evaluate = spec["perplexity"] if args.perplexity is None else args.perplexity
    name = args.name or "-".join(
        [args.model, *[r.replace(":", "_") for r in ours], *(["vs-peer-" + peer_recipe.replace(":", "_")] if peer_recipe else [])]
    )

    versions_peer = peer_versions() if peer_recipe else None
    if peer_recipe and versions_peer is None:
        print(f"peer not available ({PEER_PYTHON} missing or broken): reporting only our numbers", file=sys.stderr)
        peer_recipe = None
    model_dir, chunks_file = prepare(args.model, samples, seq_len)
    work = BENCH_ROOT / "runs" / name
    work.mkdir(parents=True, exist_ok=True)

    baseline_ppl = None
    if evaluate:
        baseline_ppl, _ = evaluate_checkpoint(model_dir, work / "logs" / "uncompressed.ppl.log")
        print(f"uncompressed model: perplexity {baseline_ppl}")

    peer_repeats = args.repeats if args.peer_repeats is None else args.peer_repeats
    runs: list[dict[str, Any]] = []
    skipped: set[str] = set()
    timeout_s = args.timeout_min * 60
    for repeat in range(max(args.repeats if ours else 0, peer_repeats if peer_recipe else 0)):
        plan = [("ours", r) for r in ours if repeat < args.repeats and r not in skipped]
        if peer_recipe and repeat < peer_repeats and "peer" not in skipped:
            plan.append(("peer", peer_recipe))
        for tool, recipe in plan:
            result = one_run(
                tool=tool, recipe=recipe, repeat=repeat, model_dir=model_dir, chunks_file=chunks_file,
                work=work, evaluate=evaluate, timeout_s=timeout_s, idle_wait_s=args.idle_wait,
            )
            runs.append(result)
            if result.get("skipped"):
                skipped.add(recipe)
            elif result["timed_out"]:
                skipped.add("peer" if tool == "peer" else recipe)
            # after every run, so a comparison stopped part-way still leaves its numbers
            results = write_results(
                name=name, kind=args.model, model_dir=model_dir, chunks_file=chunks_file, ours=ours,
                peer_recipe=peer_recipe, versions_peer=versions_peer, baseline_ppl=baseline_ppl, runs=runs,
            )
    if not runs:
        return 0
    summary, ratio = results["summary"], results["ratios_ours_over_peer"]
    out = RESULTS_DIR / f"{name}.json"
    print()
    print(
        f"{name}: {args.model} model ({results['model']['hidden_size']} hidden, "
        f"{results['model']['num_hidden_layers']} layers), {samples} x {seq_len} calibration tokens, "
        f"{results['machine']['cores']} cores; medians"
    )
    print_table(summary, ratio, baseline_ppl)
    print(f"\nresults: {out.relative_to(REPO_ROOT)}")
    return 0 if all(r["returncode"] == 0 or r.get("skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
