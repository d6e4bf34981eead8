"""Put a finished checkpoint directory at its output path so that a kill never loses both.

A compression run writes for hours and may be killed at any moment (out of memory, a job
scheduler's time limit, Ctrl-C twice). Whatever moment that is, a complete checkpoint must
remain where the next run or the user can find it, and the next run must clear what the killed
one left behind instead of letting hidden folders of gigabytes pile up.

Sibling folders. Everything llmc creates next to ``output_dir`` is named
``.<name>.<kind>-<pid>-<8 hex>``: ``tmp`` is a checkpoint being written (or, after an
exchange, the one it replaced), ``old`` is the previous checkpoint moved aside by the rename
protocol, ``probe`` is the writability test of ``check_writable``. The pid is the writer's: the
next run for the same output removes the siblings whose process is gone, restores an ``old``
one when ``output_dir`` is missing, and leaves a running writer's siblings alone. (Liveness is
judged on this machine: a writer on another host sharing the file system looks dead.)

Replacing a checkpoint. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the new and the old
directory in one step, so ``output_dir`` always holds a complete checkpoint; the old one, now
under the ``tmp`` name, is then removed. Where the kernel or file system cannot exchange, the
old directory is renamed to an ``old`` sibling, the new one to ``output_dir``, and the old one
removed; a kill between the two renames leaves no ``output_dir`` but a complete ``old`` sibling,
which the next run renames back. The new files are flushed to disk before either, so a power
cut cannot leave a renamed directory of empty files in place of a good checkpoint.

Fault injection, for tests only: ``LLMC_TEST_PAUSE_AT=<point>`` makes the process stop itself
with SIGSTOP at that point of the save, so a test can SIGKILL it in exactly that state; the
points are ``PAUSE_POINTS``, and ``after-layer-<k>`` once a streamed run has recorded layer
``k`` in its journal (``llmc.offload``). ``LLMC_TEST_NO_EXCHANGE=1`` forces the rename protocol. Unset,
each point costs one environment lookup.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import sys
from pathlib import Path

from llmc.errors import SaveError

__all__ = [
    "NO_EXCHANGE_ENV",
    "PAUSE_ENV",
    "PAUSE_POINTS",
    "check_writable",
    "clean_leftovers",
    "exchange",
    "make_sibling_dir",
    "move_into_place",
    "pause_point",
    "sync_tree",
]

logger = logging.getLogger("llmc.save")

PAUSE_ENV = "LLMC_TEST_PAUSE_AT"
NO_EXCHANGE_ENV = "LLMC_TEST_NO_EXCHANGE"
PAUSE_POINTS = ("after-first-shard", "before-swap", "between-renames", "after-swap")

_KINDS = ("tmp", "old", "probe")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def pause_point(point: str) -> None:
    """Stop the process here when a test asked for ``point`` (see the module docstring)."""
    if os.environ.get(PAUSE_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def _sibling_path(output_dir: Path, kind: str) -> Path:
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return output_dir.parent / f".{output_dir.name}.{kind}-{token}"


def make_sibling_dir(output_dir: Path, kind: str) -> Path:
    """A new hidden ``kind`` sibling of ``output_dir``, created with the user's umask."""
    while True:
        candidate = _sibling_path(output_dir, kind)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def check_writable(output_dir: Path) -> None:
    """Fail before the model is loaded, not after calibration, if the save could not happen.

    Creates the missing parents of ``output_dir`` and a hidden probe folder next to it (removed
    at once). The probe's name is the longest llmc gives a sibling, so passing it means the
    temporary folders will fit too.
    """
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        make_sibling_dir(output_dir, "probe").rmdir()
    except OSError as error:
        raise SaveError(
            f"cannot write to output directory {output_dir}: {_why_not_writable(output_dir, error)}"
        ) from error


def _why_not_writable(output_dir: Path, error: OSError) -> str:
    """The reason and the fix, as a user can act on them (not the bare errno text)."""
    existing = _nearest_existing(output_dir.parent)
    if existing is not None and not existing.is_dir():
        return (
            f"not a directory ({existing} is a file); choose an output path whose parents are "
            f"directories"
        )
    code = error.errno
    if code == errno.ENAMETOOLONG:
        return _name_too_long(output_dir, existing)
    if code == errno.EROFS:
        return "read-only file system; choose a directory on a writable file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a directory you can write to"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{os.strerror(code).lower()}; free disk space or choose another disk"
    if code == errno.ENOENT and existing is not None:
        # procfs and the like: the directory exists but refuses new entries
        return (
            f"the file system refuses new folders in {existing} (no such file or "
            f"directory); choose a directory on a writable file system"
        )
    reason = (error.strerror or str(error)).lower()
    return f"{reason}; choose another output directory"


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:  # a component too long to stat
            continue
    return None


def _name_too_long(output_dir: Path, existing: Path | None) -> str:
    try:
        limit = os.pathconf(existing or "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in output_dir.parts:
        if len(os.fsencode(part)) > limit:
            return (
                f"file name too long ({part[:24]}... has {len(os.fsencode(part))} bytes, this "
                f"file system allows {limit}); choose a shorter name"
            )
    name_bytes = len(os.fsencode(output_dir.name))
    room = len(os.fsencode(_sibling_path(output_dir, "probe").name)) - name_bytes
    if name_bytes + room > limit:
        return (
            f"file name too long (the output name has {name_bytes} bytes and llmc adds {room} "
            f"for the hidden folders it writes next to it; this file system allows {limit}); "
            f"choose a name of at most {limit - room} bytes"
        )
    return "path too long; choose a shorter path"


def _pattern(output_dir: Path) -> re.Pattern[str]:
    kinds = "|".join(_KINDS)
    return re.compile(
        rf"\.{re.escape(output_dir.name)}\.(?P<kind>{kinds})-(?P<pid>\d+)-[0-9a-f]{{8}}"
    )


def _running(pid: int) -> bool:
    """Whether process ``pid`` is alive here; a zombie (killed, not yet reaped) is not."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _is_missing_or_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def clean_leftovers(output_dir: Path) -> None:
    """Remove, or restore, the siblings of ``output_dir`` that killed runs left behind.

    An ``old`` sibling is the previous checkpoint: it is renamed back when ``output_dir`` is
    missing (the run was killed between its two renames), removed otherwise. ``tmp`` and
    ``probe`` siblings are removed. Siblings of a running process are left alone.
    """
    parent = output_dir.parent
    if not parent.is_dir():
        return
    pattern = _pattern(output_dir)
    stale: dict[str, list[tuple[Path, int]]] = {kind: [] for kind in _KINDS}
    for entry in parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is not None and not _running(int(match["pid"])):
            stale[match["kind"]].append((entry, int(match["pid"])))
    olds = sorted(stale["old"], key=lambda item: item[0].stat().st_mtime, reverse=True)
    if olds and _is_missing_or_empty(output_dir):
        old, pid = olds.pop(0)
        try:
            os.replace(old, output_dir)
            logger.warning(
                "restored the previous checkpoint at %s from %s, left by a run killed while "
                "replacing it (pid %d)",
                output_dir,
                old.name,
                pid,
            )
        except OSError as error:
            raise SaveError(
                f"cannot restore the previous checkpoint {old} to {output_dir}: "
                f"{error.strerror or error}; rename it back by hand"
            ) from error
    for old, pid in olds:
        _remove_leftover(old, f"the previous checkpoint a killed run (pid {pid}) had replaced")
    for entry, pid in stale["tmp"] + stale["probe"]:
        _remove_leftover(entry, f"a stale temporary folder left by a killed run (pid {pid})")


def _remove_leftover(path: Path, what: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not remove %s, %s; remove it by hand", path, what)
    else:
        logger.warning("removed %s, %s", path.name, what)


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    path = ctypes.c_char_p
    function.argtypes = [ctypes.c_int, path, ctypes.c_int, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where this kernel or file system cannot."""
    if sys.platform != "linux" or os.environ.get(NO_EXCHANGE_ENV):
        return False
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    first_name, second_name = os.fsencode(first), os.fsencode(second)
    if renameat2(_AT_FDCWD, first_name, _AT_FDCWD, second_name, _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def sync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk.

    Without it a power cut right after the rename can leave the new directory in place with
    files the disk never received, and the old checkpoint already gone.
    """
    if os.name != "posix":
        return
    for root, _dirs, files in os.walk(directory):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path: str | Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def move_into_place(temp_dir: Path, output_dir: Path) -> None:
    """Make the finished ``temp_dir`` the checkpoint at ``output_dir``, replacing what was there.

    Raises ``OSError`` with ``output_dir`` as it was if the new directory could not be put in
    place.
    """
    sync_tree(temp_dir)
    pause_point("before-swap")
    if _is_missing_or_empty(output_dir):
        os.replace(temp_dir, output_dir)
        _sync_parent(output_dir)
        return
    if exchange(temp_dir, output_dir):
        _sync_parent(output_dir)
        pause_point("after-swap")
        _remove_replaced(temp_dir)
    else:
        old = _sibling_path(output_dir, "old")
        os.rename(output_dir, old)
        pause_point("between-renames")
        try:
            os.rename(temp_dir, output_dir)
        except BaseException:
            os.rename(old, output_dir)
            raise
        _sync_parent(output_dir)
        pause_point("after-swap")
        _remove_replaced(old)
    logger.info("replaced the previous contents of %s", output_dir)


def _sync_parent(output_dir: Path) -> None:
    """Make the rename itself durable; the checkpoint is in place either way, so only warn."""
    if os.name != "posix":
        return
    try:
        _fsync(output_dir.parent)
    except OSError as error:
        logger.warning("could not flush %s to disk: %s", output_dir.parent, error)


def _remove_replaced(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning(
            "could not remove the replaced checkpoint %s; the next run for this output removes it",
            path,
        )
