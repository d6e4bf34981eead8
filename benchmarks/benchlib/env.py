"""What every script starts with: paths, the offline settings, the parser with ``--threads``,
comma-separated names, JSON lines and the machine's description.

Standard library only: the peer's venv imports it too. Importing it sets the Hugging Face
offline variables, because these machines have no hub and a library that tries one waits
about 25 s before failing, which would land in the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

# When this process started, near enough: the scripts import benchlib first, so a child's
# ``import_s`` counts its imports from here.
PROCESS_STARTED = time.perf_counter()

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BENCH_ROOT = Path(os.environ.get("LLMC_BENCH_ROOT", "/tmp/llmc-bench"))
PEER_PYTHON = REPO_ROOT / ".venv-peer" / "bin" / "python"

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

__all__ = [
    "BENCH_DIR",
    "BENCH_ROOT",
    "OFFLINE_ENV",
    "PEER_PYTHON",
    "PROCESS_STARTED",
    "REPO_ROOT",
    "RESULTS_DIR",
    "load_average",
    "machine",
    "machine_line",
    "names",
    "parse",
    "print_json_line",
    "script_parser",
    "set_threads",
]


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the script's docstring, with ``--threads``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads, here and in every process this one starts (default: torch's own)",
    )
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` and apply ``--threads`` before any work starts."""
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    return args


def names(
    parser: argparse.ArgumentParser, text: str, known: Collection[str], what: str
) -> list[str]:
    """The comma-separated names in ``text``; a usage error listing the unknown ones and the known."""
    given = [name for name in text.split(",") if name]
    unknown = [name for name in given if name not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; one of {', '.join(known)}")
    return given


def int_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated integers (``1,2``), a usage error naming the bad part."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in parts if not part.lstrip("-").isdigit()]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers (e.g. 1,2)")
    return [int(part) for part in parts]


def print_json_line(
    record: dict[str, Any], append_to: str | os.PathLike[str] | None = None
) -> None:
    """Print ``record`` as one JSON line, and append it to the JSON-lines file ``append_to`` if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if append_to is not None:
        with open(append_to, "a") as handle:
            handle.write(line + "\n")


def set_threads(threads: int) -> None:
    """Use ``threads`` torch threads here, and pass the setting on to child processes.

    Quality does not depend on it; fewer threads are kinder to a machine shared with others.
    """
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``/proc/loadavg`` writes them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and Python version, for a results file."""
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


def machine_line() -> str:
    """One line for a log: cores, torch's version and its thread count."""
    import torch

    return f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
