"""A save must fail early and in one line when the output cannot be written, never lose both the
old and the new checkpoint when killed, and leave no hidden folders behind the next run.

The kill tests run the real CLI in a subprocess, stop it at a named point of the save
(``LLMC_TEST_PAUSE_AT``, see ``llmc.save.atomic``) and SIGKILL it there; the disk-full test
lowers the subprocess's file size limit so that writing the weights really fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from llmc.entrypoints.oneshot import oneshot
from llmc.errors import SaveError
from llmc.save import atomic, check_output_dir
from llmc.testing import kill_when_paused

ON_LINUX = sys.platform == "linux" and Path("/proc/self/stat").exists()
OLD_MARKER = "old-run.txt"  # a file only the previous checkpoint has
CLI = [sys.executable, "-m", "llmc.cli", "oneshot", "--model", "llmc:tiny-llama"]
CLI += ["--recipe", "llmc:w4a16"]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _is_complete(path: Path) -> bool:
    """config.json, readable safetensors weights and the run report: what serving needs."""
    if not (path / "config.json").is_file() or not (path / "llmc_report.json").is_file():
        return False
    json.loads((path / "config.json").read_text())
    json.loads((path / "llmc_report.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
        weights.get_tensor(names[0])
    return bool(names)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "llmc.save" and r.levelname == "WARNING"
    ]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete checkpoint from a normal run, made once and copied into each test."""
    out = tmp_path_factory.mktemp("good") / "ckpt"
    oneshot(model="llmc:tiny-llama", recipe="llmc:w4a16", output_dir=str(out))
    return out


def _old_checkpoint(good_checkpoint: Path, out: Path) -> Path:
    shutil.copytree(good_checkpoint, out)
    (out / OLD_MARKER).write_text("the checkpoint a new run replaces")
    return out


# -- the output location is checked before the model is loaded ------------------------------


@pytest.mark.parametrize("below", ["out", "a/b/out"], ids=["parent", "grandparent"])
def test_check_output_dir_parent_is_a_file_refused(tmp_path: Path, below: str):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(
        SaveError,
        match=rf"^cannot write to output directory .*/file/{below}: not a directory \(.*/file "
        r"is a file\); choose an output path whose parents are directories$",
    ):
        check_output_dir(tmp_path / "file" / below)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_check_output_dir_name_too_long_refused(tmp_path: Path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(
        SaveError,
        match=rf"^cannot write to output directory .*: file name too long \(x{{24}}\.\.\. has "
        rf"{limit + 1} bytes, this file system allows {limit}\); choose a shorter name$",
    ):
        check_output_dir(tmp_path / ("x" * (limit + 1)) / "out")
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_name_without_room_for_hidden_folders_refused(tmp_path: Path):
    """A name that fits alone but not inside ``.<name>.tmp-<pid>-<hex>`` fails now, not later."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(
        SaveError,
        match=rf"file name too long \(the output name has {limit - 3} bytes and llmc adds \d+ "
        rf"for the hidden folders it writes next to it; this file system allows {limit}\); "
        r"choose a name of at most \d+ bytes$",
    ):
        check_output_dir(tmp_path / ("y" * (limit - 3)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not ON_LINUX, reason="needs Linux /proc and /sys")
@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("/proc/llmc-test-out/ckpt", r"the file system refuses new folders in /proc \(no such "),
        ("/sys/llmc-test-out", r"(permission denied|read-only file system); choose a directory"),
    ],
    ids=["proc", "sys"],
)
def test_check_output_dir_unwritable_parent_refused(output: str, reason: str):
    with pytest.raises(SaveError, match=rf"^cannot write to output directory {output}: {reason}"):
        check_output_dir(output)


def test_check_output_dir_creates_parents_and_removes_its_probe(tmp_path: Path):
    out = check_output_dir(tmp_path / "a" / "b" / "out")
    assert out == tmp_path / "a" / "b" / "out"
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_check_output_dir_follows_symlink_and_refuses_root(tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_output_dir(tmp_path / "link") == tmp_path / "real"
    with pytest.raises(SaveError, match=r"^output directory / is a file system root; choose"):
        check_output_dir("/")


def test_oneshot_checks_output_before_loading_the_model(tmp_path: Path):
    """The model path does not exist: the output's error wins because it is checked first."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SaveError, match=r"^cannot write to output directory .*: not a directory"):
        oneshot(
            model=str(tmp_path / "no-model-here"),
            recipe="llmc:w4a16",
            output_dir=str(tmp_path / "file" / "out"),
        )


# -- what killed runs left is cleared by the next run ----------------------------------------


@pytest.mark.skipif(not ON_LINUX, reason="liveness is read from /proc")
def test_check_output_dir_removes_stale_folders_of_dead_writers_only(tmp_path: Path, caplog):
    out = tmp_path / "out"
    dead, running = _dead_pid(), os.getppid()
    zombie = subprocess.Popen(["true"])  # exited, not yet reaped: its writer is gone too
    deadline = time.monotonic() + 10
    while _state(zombie.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    stale = [
        f".out.tmp-{dead}-0123abcd",
        f".out.probe-{dead}-0123abcd",
        f".out.tmp-{zombie.pid}-0123abcd",
    ]
    kept = [f".out.tmp-{running}-0123abcd", f".other.tmp-{dead}-0123abcd", ".out.tmp-x-0123abcd"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")

    with caplog.at_level(logging.WARNING, logger="llmc.save"):
        check_output_dir(out)
    zombie.wait()

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert sorted(_warnings(caplog)) == sorted(
        f"removed {name}, a stale temporary folder left by a killed run (pid {name.split('-')[1]})"
        for name in stale
    )


@pytest.mark.parametrize("output", ["missing", "empty", "present"])
def test_check_output_dir_restores_or_removes_old_checkpoint(tmp_path: Path, caplog, output):
    """An ``old`` sibling is restored when the output is gone, so nothing is ever lost."""
    out, pid = tmp_path / "out", _dead_pid()
    old = tmp_path / f".out.old-{pid}-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    if output != "missing":
        out.mkdir()
    if output == "present":
        (out / "config.json").write_text('{"new": true}')

    with caplog.at_level(logging.WARNING, logger="llmc.save"):
        if output == "present":
            check_output_dir(out, overwrite=True)
        else:
            with pytest.raises(SaveError, match=r"out is not empty; pass overwrite=True"):
                check_output_dir(out)

    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    if output == "present":
        assert (out / "config.json").read_text() == '{"new": true}'
        assert _warnings(caplog) == [
            f"removed {old.name}, the previous checkpoint a killed run (pid {pid}) had replaced"
        ]
    else:
        assert (out / "config.json").read_text() == "{}"
        assert _warnings(caplog) == [
            f"restored the previous checkpoint at {out} from {old.name}, left by a run killed "
            f"while replacing it (pid {pid})"
        ]


# -- the swap ----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_exchange_works_on_this_file_system(tmp_path: Path):
    """Otherwise the kill tests below would silently test only the rename protocol."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from-a").touch()
    assert atomic.exchange(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    assert list((tmp_path / "a").iterdir()) == []


@pytest.mark.parametrize("protocol", ["exchange", "rename"])
def test_move_into_place_replaces_and_leaves_no_sibling(tmp_path: Path, monkeypatch, protocol):
    if protocol == "rename":
        monkeypatch.setenv(atomic.NO_EXCHANGE_ENV, "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    temp = atomic.make_sibling_dir(out, "tmp")
    (temp / "new.txt").write_text("new")

    atomic.move_into_place(temp, out)

    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_move_into_place_failed_rename_puts_old_back(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(atomic.NO_EXCHANGE_ENV, "1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    temp = atomic.make_sibling_dir(out, "tmp")
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == temp:
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left on device"):
        atomic.move_into_place(temp, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", temp.name])


# -- for real: a full file system, and SIGKILL while saving ------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="needs RLIMIT_FSIZE")
def test_cli_write_failure_is_one_line_and_keeps_old_checkpoint(tmp_path: Path, good_checkpoint):
    """The weights file exceeds the file size limit: EFBIG, raised by safetensors' own code."""
    out = _old_checkpoint(good_checkpoint, tmp_path / "out")
    limit_then_run = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY)); "
        "sys.argv = ['llmc', *sys.argv[1:]]; "
        "runpy.run_module('llmc.cli', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", limit_then_run, *CLI[3:], "--output-dir", str(out)]
    result = subprocess.run(command + ["--overwrite"], capture_output=True, text=True, timeout=300)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("llmc: error: ")
    pattern = (
        rf"^llmc: error: could not write the checkpoint to {out}: .*File too large.*; check "
        r"free disk space and permissions$"
    )
    assert re.match(pattern, result.stderr.splitlines()[-1])
    assert _is_complete(out) and (out / OLD_MARKER).is_file()
    assert _siblings(out) == []


KILL_CASES = {
    # id: (pause point, overwrite an old checkpoint, force the rename protocol, at OUT after kill)
    "new-output-after-first-shard": ("after-first-shard", False, False, None),
    "overwrite-before-swap": ("before-swap", True, False, "old"),
    "overwrite-after-exchange": ("after-swap", True, False, "new"),
    "overwrite-between-renames": ("between-renames", True, True, None),
}


def _kill_at(point: str, out: Path, *, overwrite: bool, rename: bool, log: Path) -> int:
    """Run the CLI until it stops itself at ``point``, SIGKILL it there; returns its pid."""
    env = {k: v for k, v in os.environ.items() if k != atomic.NO_EXCHANGE_ENV}
    env[atomic.PAUSE_ENV] = point
    if rename:
        env[atomic.NO_EXCHANGE_ENV] = "1"
    command = [*CLI, "--output-dir", str(out), *(["--overwrite"] if overwrite else [])]
    return kill_when_paused(command, env, log)


@pytest.mark.skipif(not ON_LINUX, reason="waits on /proc/<pid>/stat")
@pytest.mark.parametrize(
    ("point", "overwrite", "rename", "at_out"), KILL_CASES.values(), ids=KILL_CASES
)
def test_cli_killed_while_saving_keeps_a_checkpoint_and_next_run_cleans_up(
    tmp_path: Path, good_checkpoint, caplog, point, overwrite, rename, at_out
):
    out = tmp_path / "out"
    if overwrite:
        _old_checkpoint(good_checkpoint, out)
    pid = _kill_at(point, out, overwrite=overwrite, rename=rename, log=tmp_path / "run.log")

    # the state the kill left: a complete checkpoint at OUT, or (no old one, or killed between
    # the two renames) OUT absent and the old checkpoint, if any, where the next run restores it
    if at_out is None:
        assert not out.exists()
    else:
        assert _is_complete(out) and (out / OLD_MARKER).is_file() == (at_out == "old")
    left = _siblings(out)
    assert left and all(f"-{pid}-" in name for name in left)
    temps = [tmp_path / name for name in left if ".tmp-" in name]
    assert len(temps) == 1
    if point == "after-first-shard":
        assert (temps[0] / "model.safetensors").is_file() and not (
            temps[0] / "config.json"
        ).exists()
    expected = [
        f"removed {temps[0].name}, a stale temporary folder left by a killed run (pid {pid})"
    ]

    with caplog.at_level(logging.WARNING, logger="llmc.save"):
        if rename:
            olds = [tmp_path / name for name in left if ".old-" in name]
            assert len(olds) == 1 and _is_complete(olds[0]) and (olds[0] / OLD_MARKER).is_file()
            expected.insert(
                0,
                f"restored the previous checkpoint at {out} from {olds[0].name}, left by a run "
                f"killed while replacing it (pid {pid})",
            )
            # a next run without --overwrite puts the old checkpoint back and refuses to replace it
            with pytest.raises(SaveError, match=r"is not empty; pass overwrite=True"):
                check_output_dir(out)
            assert _is_complete(out) and (out / OLD_MARKER).is_file()
        oneshot(model="llmc:tiny-llama", recipe="llmc:w4a16", output_dir=str(out), overwrite=True)

    assert _is_complete(out) and not (out / OLD_MARKER).exists()
    assert _siblings(out) == []
    assert _warnings(caplog) == expected
