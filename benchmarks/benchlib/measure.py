"""A whole process under ``/usr/bin/time -v``, and waiting for the machine to be idle first.

Whole processes, because interpreter start, imports, loading and saving are part of what a user
waits for. The machines these run on are shared: ``others_cpu_s`` records how much CPU the rest
of the machine took during a run, so that a slowed-down run can be told from a slow one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchlib.env import OFFLINE_ENV

__all__ = ["cpu_busy_seconds", "machine_busy_fraction", "measure", "wait_until_idle"]

_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_USER = re.compile(r"User time \(seconds\): ([\d.]+)")
_SYS = re.compile(r"System time \(seconds\): ([\d.]+)")
_STATUS = re.compile(r"Exit status: (-?\d+)")


def _clock_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot, all cores (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all cores busy over the next ``seconds`` (0 idle .. 1 all cores busy)."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    return (cpu_busy_seconds() - before) / (seconds * (os.cpu_count() or 1))


def wait_until_idle(max_wait_s: float = 120.0, threshold: float = 0.15) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes leave the cores idle; the last share seen.

    ``max_wait_s <= 0`` does not wait or look at all, and returns None.
    """
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(4)
        busy = machine_busy_fraction()
    return round(busy, 3)


def _gnu_time() -> str:
    """GNU time's path, installing Debian's ``time`` package (as root) when it is missing."""
    time_bin = Path("/usr/bin/time")
    if not time_bin.is_file():
        if os.geteuid() != 0:
            raise RuntimeError(
                "/usr/bin/time is missing: sudo apt-get update && sudo apt-get install -y time"
            )
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "time"], check=True, stdout=subprocess.DEVNULL)
    return str(time_bin)


def _run(
    cmd: list[str], log: Any, env: dict[str, str], cwd: Any, timeout_s: float | None
) -> tuple[int, bool]:
    """Run ``cmd`` in its own process group; on timeout end the whole group. (returncode, timed out)."""
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
    )
    try:
        process.wait(timeout=timeout_s)
        return process.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return process.returncode, True


def measure(
    cmd: Sequence[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: ``{wall_s, peak_rss_mb, returncode, ...}``.

    ``peak_rss_mb`` is the largest resident set of the process (GNU time's "Maximum resident set
    size", in MiB). The command's stdout and stderr go to ``log_path`` (else are discarded); the
    time report goes to its own file so it never mixes with the command's output. After
    ``timeout_s`` the command's process group is killed and ``timed_out`` is set.
    ``others_cpu_s`` is the CPU time the rest of the machine used meanwhile: on a shared machine
    a large value marks a run slowed down by contention.
    """
    time_bin = _gnu_time()
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as report:
        report_path = report.name
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    busy_before = cpu_busy_seconds()
    try:
        returncode, timed_out = _run(
            [time_bin, "-v", "-o", report_path, *map(str, cmd)], log, full_env, cwd, timeout_s
        )
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    outer_wall = time.perf_counter() - started
    machine_cpu = cpu_busy_seconds() - busy_before
    text = Path(report_path).read_text(errors="replace")
    os.unlink(report_path)
    wall, rss, user, system = (pattern.search(text) for pattern in (_WALL, _RSS, _USER, _SYS))
    status = _STATUS.search(text)
    if status is not None and returncode == 0:
        returncode = int(status.group(1))
    own_cpu = (float(user.group(1)) if user else 0.0) + (float(system.group(1)) if system else 0.0)
    return {
        "wall_s": round(_clock_seconds(wall.group(1)), 2) if wall else round(outer_wall, 2),
        "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "user_s": float(user.group(1)) if user else None,
        "sys_s": float(system.group(1)) if system else None,
        "others_cpu_s": round(max(machine_cpu - own_cpu, 0.0), 1),
        "returncode": returncode,
        "timed_out": timed_out,
        "cmd": [str(c) for c in cmd],
        "log": str(log_path) if log_path is not None else None,
    }
