"""Every preset family by round-to-nearest and GPTQ, ours and llm-compressor's: held-out
perplexity, checkpoint size, and for RTN whether the checkpoints hold the same tensors.

Run with llmc's venv (llmc-gptq installed; the peer's venv for its side)::

    python benchmarks/scheme_quality.py                          # every scheme, both tools
    python benchmarks/scheme_quality.py --schemes FP8,NVFP4A16 --methods rtn --no-peer

The schemes are ``benchlib.recipes.BENCHMARK_SCHEMES`` (compressed-tensors' preset names; the
recipes are ``SCHEME_RECIPES``: ``QuantizationModifier`` or ``GPTQModifier`` with the preset on
every Linear but ``lm_head``, for both tools). The shared driver (``benchlib.driver``) runs each
configuration as its own process on the embedded model and the same calibration chunks and
evaluates each checkpoint in another process (transformers + compressed-tensors). A scheme one
side cannot produce is reported as such (its run fails), not skipped silently.

The RTN tensor comparison reads both checkpoints with safetensors: the same names, shapes and
dtypes, and per tensor the share of elements that differ (codes and scales equal up to
rounding ties is the target).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchlib import driver
from benchlib.data import prepare
from benchlib.env import BENCH_ROOT, PEER_PYTHON, RESULTS_DIR, parse, script_parser
from benchlib.recipes import BENCHMARK_SCHEMES, SCHEME_RECIPES


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _last_error(run: dict) -> str:
    """The last line of a failed run's log that names an error, for the table's notes."""
    log = Path(run.get("log") or "")
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["failed"])[-1][:300]


def compare_tensors(ours: Path, theirs: Path) -> dict:
    """Names, shapes, dtypes and differing elements of two checkpoints' tensors."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                found.update({name: f.get_tensor(name) for name in f.keys()})
        return found

    a, b = tensors(ours), tensors(theirs)
    only_ours, only_theirs = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    layout, differing = [], {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            layout.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if x.dtype.is_floating_point:
            unequal = (x.float() != y.float()) & ~(x.float().isnan() & y.float().isnan())
        else:
            unequal = x != y
        if bool(unequal.any()):
            differing[name] = round(unequal.float().mean().item(), 6)
    return {
        "tensors": len(a),
        "only_ours": only_ours[:10],
        "only_theirs": only_theirs[:10],
        "layout_differs": layout[:10],
        "values_differ": dict(sorted(differing.items(), key=lambda kv: -kv[1])[:10]),
        "values_differ_count": len(differing),
    }


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    driver.add_arguments(parser, repeats=1, timeout_min=40.0, idle_wait=0.0)
    parser.add_argument("--schemes", default=",".join(BENCHMARK_SCHEMES), help="comma-separated preset names")
    parser.add_argument("--methods", default="rtn,gptq", help="comma-separated: rtn, gptq")
    parser.add_argument("--no-peer", action="store_true", help="only our side")
    args = parse(parser, argv)
    schemes = [s.strip().upper() for s in args.schemes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    by_key = {(method, scheme): name for name, (method, scheme) in SCHEME_RECIPES.items()}
    unknown = [s for s in schemes if ("rtn", s) not in by_key] + [m for m in methods if m not in ("rtn", "gptq")]
    if unknown:
        parser.error(f"unknown scheme or method {unknown[0]!r}; schemes: {', '.join(BENCHMARK_SCHEMES)}")
    recipes = [by_key[(method, scheme)] for scheme in schemes for method in methods]
    model_dir, chunks = prepare(args.model, args.samples, args.seq_len)
    peer = not args.no_peer and Path(PEER_PYTHON).exists()
    configs = []
    for recipe in recipes:
        configs.append(driver.ours(f"ours:{recipe}", model_dir, chunks, "--recipe", recipe, rounds=1))
        if peer:
            configs.append(driver.peer(f"peer:{recipe}", model_dir, chunks, recipe, rounds=1))
    name = args.name or "scheme-quality"
    work = BENCH_ROOT / "runs" / name
    baseline, _ = driver.evaluate_checkpoint(model_dir, work / "logs" / "uncompressed.ppl.log")
    print(f"uncompressed model: perplexity {baseline}", flush=True)
    runs = driver.interleave(
        configs, work=work, idle_wait_s=args.idle_wait, timeout_s=args.timeout_min * 60, evaluate_rounds=1
    )
    table = {recipe: {"ours": {}, "peer": {}} for recipe in recipes}
    for run in runs:
        tool, _, recipe = run["label"].partition(":")
        ok = run.get("returncode") == 0 and run.get("output")
        table[recipe][tool] = {
            "perplexity": run.get("perplexity"),
            "bytes": _checkpoint_bytes(Path(run["output"])) if ok else None,
            "seconds": run.get("wall_s"),
            "output": run.get("output") if ok else None,
            "failed": None if ok else _last_error(run),
        }
    for recipe in recipes:
        ours, theirs = table[recipe]["ours"], table[recipe]["peer"]
        if SCHEME_RECIPES[recipe][0] == "rtn" and ours.get("output") and theirs.get("output"):
            table[recipe]["tensors"] = compare_tensors(Path(ours["output"]), Path(theirs["output"]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({"baseline_perplexity": baseline, "table": table, "runs": runs}, indent=2, default=str))
    print(f"\nheld-out perplexity (uncompressed {baseline:.3f}), checkpoint MB\n")
    print("| recipe | llmc ppl | peer ppl | llmc / peer | llmc MB | peer MB | RTN tensors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for recipe, row in table.items():
        ours, theirs = row["ours"], row["peer"]
        a, b = ours.get("perplexity"), theirs.get("perplexity")
        ratio = f"{a / b:.4f}" if a and b else "—"

        def mb(side: dict) -> str:
            return f"{side['bytes'] / 1e6:.2f}" if side.get("bytes") else ("failed" if side.get("failed") else "—")

        tensors = row.get("tensors")
        if tensors is None:
            same = "—"
        elif tensors["only_ours"] or tensors["only_theirs"] or tensors["layout_differs"]:
            same = "layout differs"
        else:
            same = "equal" if not tensors["values_differ_count"] else f"{tensors['values_differ_count']} differ"
        print(f"| {recipe} | {a and f'{a:.3f}' or '—'} | {b and f'{b:.3f}' or '—'} | {ratio} | {mb(ours)} | {mb(theirs)} | {same} |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
