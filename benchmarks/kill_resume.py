"""A streamed run (``offload=disk``) whole, and the same run killed in its middle and resumed.

    python benchmarks/kill_resume.py --model llama8b-32 --kill-after 16
    python benchmarks/kill_resume.py --model llama8b-8 --kill-after 4 --reuse-full

Three processes of ``ours_oneshot.py``, each under ``/usr/bin/time -v``: (1) the uninterrupted
run; (2) the same command with another output, sent SIGKILL (no chance to clean up, as the OOM
killer or a power loss would) once its journal names ``--kill-after`` finished layers; (3) that
command again, which must resume at the first unfinished layer. The resumed checkpoint must be
byte-identical to the uninterrupted one, file for file (the report, which holds timings, is
compared apart). Writes ``results/<name>.json``: peak RSS, wall time and the per-layer times and
peaks of each process, the layers the rerun resumed, and the digests.

``--reuse-full`` keeps an earlier uninterrupted checkpoint (from the same ``--name``) instead of
running it again: the run is the long part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import driver
from benchlib.data import add_model_arguments, prepare
from benchlib.env import BENCH_ROOT, RESULTS_DIR, parse, script_parser
from benchlib.results import calibration_facts, model_facts, our_versions, write_results

REPORT = "llmc_report.json"


def _journal_layers(work_dir: Path) -> int:
    try:
        return len(json.loads((work_dir / "journal.json").read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return 0


def _processes_writing(output: Path) -> list[int]:
    """The Python processes whose command line names ``output`` (not ``/usr/bin/time`` above them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(output).encode() in argv and "python" in Path(argv[0].decode(errors="replace")).name:
            found.append(int(entry.name))
    return found


def _kill_after(output: Path, layers: int, done: threading.Event, killed: dict[str, Any]) -> None:
    """SIGKILL the run writing ``output`` once its journal names ``layers`` finished layers."""
    work_dir = output.parent / f".{output.name}.partial"
    while not done.is_set():
        finished = _journal_layers(work_dir)
        if finished >= layers:
            pids = _processes_writing(output)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.update(layers=finished, pids=pids, at=time.strftime("%H:%M:%S"))
            print(f"    SIGKILL to {pids} with {finished} layers in the journal", flush=True)
            return
        time.sleep(0.5)


def _digests(checkpoint: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != REPORT:
            sha = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    sha.update(block)
            digests[str(path.relative_to(checkpoint))] = sha.hexdigest()
    return digests


def _layer_rows(checkpoint: Path) -> list[dict[str, Any]]:
    try:
        report = json.loads((checkpoint / REPORT).read_text())
    except (OSError, ValueError):
        return []
    return report.get("layers", [])


def _killed_peak(resumed_rows: list[dict[str, Any]], killed_layers: int) -> float | None:
    """The killed process's own per-layer peak, from the rows its journal handed the rerun.

    GNU time's maximum resident set of a process ended by SIGKILL reads far below what the
    process held (838 MB against the 3.9-4.1 GB its layers recorded, on the 8B shape), so the
    killed run's peak is taken from the layers it finished.
    """
    peaks = [row["peak_rss_mb"] for row in resumed_rows[:killed_layers] if "peak_rss_mb" in row]
    return max(peaks) if peaks else None


def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--recipe", default="gptq-w4a16", help="a recipe of ours_oneshot.py")
    parser.add_argument(
        "--kill-after", type=int, required=True, help="finished layers before SIGKILL"
    )
    parser.add_argument("--name", help="results name (default: <model>-<recipe>-kill-resume)")
    parser.add_argument(
        "--reuse-full", action="store_true", help="keep an earlier uninterrupted run"
    )
    parser.add_argument(
        "--idle-wait", type=float, default=60.0, help="seconds to wait for a quiet machine"
    )
    args = parse(parser, argv)
    name = args.name or f"{args.model}-{args.recipe}-kill-resume"
    model_dir, chunks = prepare(args.model, args.samples, args.seq_len)
    work = BENCH_ROOT / "runs" / name
    full, resumed = work / "full", work / "resumed"

    def run(label: str, output: Path) -> dict[str, Any]:
        # the output is ours to name: the driver's own checkpoint folder would be emptied first
        config = driver.ours(
            label,
            model_dir,
            chunks,
            "--recipe",
            args.recipe,
            "--offload",
            "disk",
            "--output",
            str(output),
            rounds=1,
        )
        config = dataclasses.replace(config, writes_checkpoint=False)
        work.mkdir(parents=True, exist_ok=True)
        return driver.one_run(config, 0, work=work, idle_wait_s=args.idle_wait, timeout_s=None)

    if args.reuse_full and (full / REPORT).is_file():
        previous = json.loads((RESULTS_DIR / f"{name}.json").read_text())["runs"]
        runs = [next(r for r in previous if r["label"] == "full")]
    else:
        runs = [run("full", full)]
    runs[0]["layers"] = _layer_rows(full)

    # the killed run starts from nothing (an earlier journal would be resumed); a watcher
    # thread sends SIGKILL once the journal names enough layers
    for stale in (resumed, resumed.parent / f".{resumed.name}.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    done, killed = threading.Event(), {}
    watcher = threading.Thread(target=_kill_after, args=(resumed, args.kill_after, done, killed))
    watcher.start()
    runs.append(run("killed", resumed))
    done.set()
    watcher.join()
    runs[1]["killed"] = killed
    runs.append(run("resumed", resumed))
    runs[2]["layers"] = _layer_rows(resumed)
    runs[1]["layers_peak_rss_mb"] = _killed_peak(runs[2]["layers"], killed.get("layers", 0))

    full_digests, resumed_digests = _digests(full), _digests(resumed)
    differing = sorted(
        path
        for path in set(full_digests) | set(resumed_digests)
        if full_digests.get(path) != resumed_digests.get(path)
    )
    report = json.loads((resumed / REPORT).read_text()) if (resumed / REPORT).is_file() else {}
    facts = {
        "model": model_facts(model_dir),
        "calibration": calibration_facts(chunks),
        "versions": {"ours": our_versions(), "peer": None},
        "kill_after_layers": args.kill_after,
        "resumed_layers": report.get("resumed_layers"),
        "checkpoint_files": len(full_digests),
        "checkpoint_bytes": sum(p.stat().st_size for p in full.rglob("*") if p.is_file()),
        "identical": not differing and bool(full_digests),
        "differing_files": differing,
        "digests": full_digests,
    }
    write_results(name, runs, peer=None, floor=None, **facts)
    total = runs[1]["wall_s"] + runs[2]["wall_s"]
    print(
        f"full {runs[0]['wall_s']:.0f} s, {runs[0]['peak_rss_mb']:.0f} MB; killed + resumed "
        f"{total:.0f} s, peaks {runs[1]['peak_rss_mb']:.0f} / {runs[2]['peak_rss_mb']:.0f} MB; "
        f"resumed at layer {facts['resumed_layers']}; identical: {facts['identical']} "
        f"({len(full_digests)} files{', differing: ' + ', '.join(differing) if differing else ''})",
        flush=True,
    )
    return 0 if facts["identical"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
