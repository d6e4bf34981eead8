"""What a driver makes of its runs: medians, quiet runs, ratios, a table and ``results/<name>.json``.

A run is *quiet* when other processes used at most 10 % of the machine's CPU capacity while it
ran (``others_cpu_s <= 0.1 × wall_s × cores``). Contention hurts unevenly (code that
synchronises two OpenMP threads thousands of times slows down far more than big matrix
products), so the quiet medians are the ones to read when there are any.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib.child import load_chunks
from benchlib.env import PEER_PYTHON, REPO_ROOT, RESULTS_DIR, machine

QUIET_SHARE = 0.10
# from each run's own report: medians of these go into the summary when runs report them
_OWN_FIGURES = ("oneshot_s", "solves_s", "solve_s", "mean_sparsity")
_RATIO_KEYS = (
    "wall_s",
    "quiet_wall_s",
    "peak_rss_mb",
    "cpu_s",
    "oneshot_s",
    "quiet_oneshot_s",
    "perplexity",
)

__all__ = [
    "QUIET_SHARE",
    "is_quiet",
    "our_versions",
    "pair_table",
    "peer_versions",
    "print_table",
    "ratios",
    "summarize",
    "write_results",
]


def is_quiet(run: dict[str, Any]) -> bool:
    """Whether other processes used at most 10% of the machine's CPU capacity during the run."""
    others = run.get("others_cpu_s")
    return others is not None and others <= QUIET_SHARE * run["wall_s"] * (os.cpu_count() or 1)


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _own(run: dict[str, Any], key: str) -> Any:
    return (run.get("internal") or {}).get(key)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: how many runs succeeded and were quiet, and the medians over the successful ones."""
    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        good = [r for r in mine if r["returncode"] == 0 and not r["timed_out"]]
        quiet = [r for r in good if is_quiet(r)]
        row = {
            "runs": len(good),
            "quiet_runs": len(quiet),
            "failed": sum(1 for r in mine if not r.get("skipped")) - len(good),
            "skipped": sum(1 for r in mine if r.get("skipped")),
            "wall_s": _median([r["wall_s"] for r in good]),
            "quiet_wall_s": _median([r["wall_s"] for r in quiet]),
            "quiet_oneshot_s": _median([_own(r, "oneshot_s") for r in quiet]),
            "peak_rss_mb": _median([r["peak_rss_mb"] for r in good]),
            "cpu_s": _median([(r["user_s"] or 0) + (r["sys_s"] or 0) for r in good]),
            "others_cpu_s": _median([r.get("others_cpu_s") for r in good]),
            "perplexity": _median([r.get("perplexity") for r in good]),
            "two_four_share": _median([(r.get("eval") or {}).get("two_four_share") for r in good]),
        }
        for key in _OWN_FIGURES:
            row[key] = _median([_own(r, key) for r in good])
        summary[label] = row
    return summary


def ratios(summary: dict[str, dict[str, Any]], reference: str | None) -> dict[str, dict[str, Any]]:
    """Every other label's medians divided by ``reference``'s (below 1: smaller than the reference)."""
    if reference is None or not summary.get(reference, {}).get("runs"):
        return {}
    base = summary[reference]
    return {
        label: {
            key: round(row[key] / base[key], 3) if row.get(key) and base.get(key) else None
            for key in _RATIO_KEYS
        }
        for label, row in summary.items()
        if label != reference and row["runs"]
    }


_COLUMNS = (
    ("n", 3, 0),
    ("quiet", 6, 0),
    ("wall s", 9, 1),
    ("quiet wall s", 13, 1),
    ("oneshot s", 10, 1),
    ("peak RSS MB", 12, 0),
    ("ppl", 9, 3),
    ("others cpu s", 13, 1),
    ("wall/peer", 10, 3),
    ("quiet/peer", 11, 3),
    ("RSS/peer", 9, 3),
    ("wall/floor", 11, 3),
)
_PPL_OFFSET = sum(width for _, width, _ in _COLUMNS[:6])


def _values(row: dict[str, Any], peer: dict[str, Any], floor: dict[str, Any]) -> tuple[Any, ...]:
    """One table row's values, in the order of ``_COLUMNS``."""
    return (
        row["runs"], row["quiet_runs"], row["wall_s"], row["quiet_wall_s"], row["oneshot_s"],
        row["peak_rss_mb"], row["perplexity"], row["others_cpu_s"], peer.get("wall_s"),
        peer.get("quiet_wall_s"), peer.get("peak_rss_mb"), floor.get("wall_s"),
    )  # fmt: skip


def _fmt(value: Any, width: int, digits: int) -> str:
    if isinstance(value, (int, float)):
        return format(value, f"{width}.{digits}f")
    return "-".rjust(width)


def print_table(
    summary: dict[str, dict[str, Any]],
    *,
    over_peer: dict[str, dict[str, Any]],
    over_floor: dict[str, dict[str, Any]],
    baseline_ppl: float | None,
) -> None:
    """Medians per label, with the ratios to the peer and to the floor where there are any."""
    label_width = max([len(label) for label in summary] + [18]) + 2
    header = f"{'run':<{label_width}}" + "".join(f"{name:>{width}}" for name, width, _ in _COLUMNS)
    print(header)
    print("-" * len(header))
    for label, row in summary.items():
        values = _values(row, over_peer.get(label, {}), over_floor.get(label, {}))
        cells = (_fmt(value, width, digits) for value, (_, width, digits) in zip(values, _COLUMNS))
        print(f"{label:<{label_width}}" + "".join(cells))
    if baseline_ppl is not None:
        print(f"{'uncompressed model':<{label_width}}{'':>{_PPL_OFFSET}}{baseline_ppl:>9.3f}")
    print(
        f"(medians; 'quiet' runs are those during which other processes used at most "
        f"{QUIET_SHARE:.0%} of the machine's CPU)"
    )


def _ratio(ours: Any, theirs: Any) -> float | None:
    return round(ours / theirs, 4) if ours and theirs else None


def pair_table(
    summary: dict[str, dict[str, Any]], methods: list[str], *, baseline_ppl: float | None
) -> list[dict[str, Any]]:
    """Print and return, per method, ``ours:M`` against ``peer:M``: perplexity, wall, RSS, ratios.

    The target is a perplexity ratio at most 1.002 for every method. ``2:4``: the share of the
    checkpoint's groups of four weights with two zeros or more (``perplexity.py``), which says
    whether a pruned-then-quantized checkpoint is still 2:4 sparse.
    """
    rows = []
    for method in methods:
        ours, peer = summary.get(f"ours:{method}", {}), summary.get(f"peer:{method}", {})
        rows.append(
            {
                "method": method,
                "ours_ppl": ours.get("perplexity"),
                "peer_ppl": peer.get("perplexity"),
                "ppl_ratio": _ratio(ours.get("perplexity"), peer.get("perplexity")),
                "ours_wall_s": ours.get("wall_s"),
                "peer_wall_s": peer.get("wall_s"),
                "wall_ratio": _ratio(ours.get("wall_s"), peer.get("wall_s")),
                "ours_rss_mb": ours.get("peak_rss_mb"),
                "peer_rss_mb": peer.get("peak_rss_mb"),
                "ours_two_four": ours.get("two_four_share"),
                "peer_two_four": peer.get("two_four_share"),
            }
        )
    header = ("method", "ours ppl", "peer ppl", "ppl ratio", "ours wall", "peer wall", "wall ratio",
              "ours RSS", "peer RSS", "ours 2:4", "peer 2:4")  # fmt: skip
    print(f"{header[0]:<30}" + "".join(f"{h:>11}" for h in header[1:]))
    for row in rows:
        values = list(row.values())[1:]
        digits = (3, 3, 4, 1, 1, 3, 0, 0, 3, 3)
        print(f"{row['method']:<30}" + "".join(_fmt(v, 11, d) for v, d in zip(values, digits)))
    if baseline_ppl is not None:
        print(f"{'uncompressed model':<30}{baseline_ppl:>11.3f}")
    return rows


def our_versions() -> dict[str, str]:
    """The versions of llmc's packages and its main dependencies, and the git revision."""
    import importlib.metadata as metadata

    versions = {}
    for package in (
        "llmc-core",
        "llmc-gptq",
        "llmc-sparsity",
        "compressed-tensors",
        "torch",
        "transformers",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    rev = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    versions["git"] = rev.stdout.strip()
    return versions


def peer_versions() -> dict[str, str] | None:
    """Versions in the peer's venv, or None when it is not set up (or does not import llmcompressor)."""
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
        print(f"the peer venv does not import llmcompressor:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_facts(model_dir: Path) -> dict[str, Any]:
    """The shape of the model (from its config.json) and the size of its weights."""
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
    return {
        "path": str(model_dir),
        **{k: config.get(k) for k in keys},
        "safetensors_mb": round(size / 2**20, 1),
    }


def calibration_facts(chunks_file: Path) -> dict[str, Any]:
    """Samples × tokens of the chunks file, with its hash (both tools read the same bytes)."""
    samples, seq_len = load_chunks(chunks_file).shape
    return {
        "samples": int(samples),
        "seq_len": int(seq_len),
        "file": str(chunks_file),
        "sha256": _sha256(chunks_file),
    }


def _compact_log(source: Path, target: Path) -> None:
    """Copy a log keeping only the last state of each progress bar (tqdm rewrites with CR)."""
    text = source.read_text(errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if "\r" in line else line for line in text.split("\n")]
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in lines]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines))


def write_results(
    name: str, runs: list[dict[str, Any]], *, peer: str | None, floor: str | None, **facts: Any
) -> dict[str, Any]:
    """Summarize the runs so far into ``results/<name>.json``, with a compacted copy of each log.

    ``peer`` and ``floor`` are the labels the others are divided by; ``facts`` (machine, model,
    calibration, versions, ...) go into the file as they are.
    """
    summary = summarize(runs)
    logs_dir = RESULTS_DIR / name / "logs"
    for run in runs:
        log = Path(run["log"]) if run.get("log") else None
        if log is not None and log.is_file():
            _compact_log(log, logs_dir / log.name)
            run["log_copy"] = str((logs_dir / log.name).relative_to(REPO_ROOT))
    results = {
        "name": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        **facts,
        "quiet_rule": f"others_cpu_s <= {QUIET_SHARE} * wall_s * cores",
        "summary": summary,
        "ratios_over_peer": ratios(summary, peer),
        "ratios_over_floor": ratios(summary, floor),
        "runs": runs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results
