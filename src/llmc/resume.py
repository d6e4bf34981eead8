"""The journal of a streamed run, so that a crash costs the unfinished layer, not the run.

A streamed run (``offload='disk'``) writes each finished layer's compressed tensors to a part
file as soon as the layer is done, in a work folder next to the output (``.<name>.partial``),
together with the inputs of the next layer and a journal: the run's fingerprint and the layers
finished so far. Running the same command again after a kill (SIGKILL, out of memory, power
loss) finds the folder, checks the fingerprint and continues at the first unfinished layer; the
checkpoint it writes is byte-identical to an uninterrupted run's, because the next layer sees
exactly the inputs it would have seen. When anything that decides the result changed (the
model's files, the calibration data, the recipe, the arguments, llmc's version) the
fingerprint differs and the run starts over, saying why in one line.

Each file is written under a temporary name, flushed and renamed, and the journal is updated
last, so a kill at any moment leaves a journal that names only layers whose part and next
inputs are complete. A lock (``flock``) keeps a second run for the same output from using the
folder while the first is alive. The folder is removed once the checkpoint is in place.

**Several ranks** (torchrun): rank 0 holds the lock, writes the parts and the journal and
decides whether to resume; the others follow its decision (``RunJournal.following``). Each
rank keeps the next layer's inputs of its own samples in its own file
(``inputs-00003-rank1.pt``), written before rank 0 records the layer, so a journal names a layer
only once every rank's inputs of the next one are complete. The fingerprint covers every rank's
share of the data, so a rerun with another rank count starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from llmc.distributed import barrier
from llmc.errors import SaveError
from llmc.save.safetensors_stream import (
    TensorEntry,
    entries_of_file,
    entry_of_tensor,
    write_safetensors,
)

__all__ = ["RunJournal", "fingerprint", "work_dir_for"]

logger = logging.getLogger("llmc.resume")

JOURNAL = "journal.json"
LOCK = "lock"
VERSION = 1


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.partial"


def _hash_tensor(sha: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous().cpu()
    sha.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    sha.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def fingerprint(
    *,
    model_files: Iterable[Path],
    recipe_text: str,
    batches: Sequence[Mapping[str, torch.Tensor]] | None,
    settings: Mapping[str, Any],
) -> dict[str, str]:
    """One digest per input that decides the checkpoint, so a mismatch can say which changed.

    Model files count by name, size and modification time (hashing gigabytes would cost
    minutes); the config is hashed whole.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        llmc_version = version("llmc-core")
    except PackageNotFoundError:
        llmc_version = "unknown"
    files = hashlib.sha256()
    for path in sorted(set(model_files)):
        stat = path.stat()
        files.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        if path.suffix == ".json":
            files.update(path.read_bytes())
    data = hashlib.sha256()
    for batch in batches or ():
        for key in sorted(batch):
            data.update(key.encode())
            _hash_tensor(data, batch[key])
    return {
        "model files": files.hexdigest(),
        "calibration data": data.hexdigest(),
        "recipe": hashlib.sha256(recipe_text.encode()).hexdigest(),
        "arguments": hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest(),
        "llmc version": llmc_version,
    }


def _fsync_write(path: Path, write: Any) -> None:
    """Write through ``write(temp_path)``, flush it to disk and rename it to ``path``."""
    temp = path.with_name(f"{path.name}.writing")
    write(temp)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


@attrs.define
class RunJournal:
    """The work folder of one streamed run (see module docstring)."""

    directory: Path
    fingerprint: dict[str, str]
    finished: list[str] = attrs.field(factory=list)
    rows: list[dict[str, Any]] = attrs.field(factory=list)
    layer_stats: list[dict[str, Any]] = attrs.field(factory=list)
    modules: dict[str, Any] = attrs.field(factory=dict)
    resumed: int = 0
    # under torchrun: this process's rank, and whether it writes the journal (rank 0 does)
    rank: int = 0
    ranks: int = 1
    spills: int = 0
    _lock: Any = None

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @classmethod
    def open(cls, output_dir: Path, fingerprint: dict[str, str], *, resume: bool, ranks: int = 1) -> RunJournal:
        """The journal to continue, or a fresh one (the old folder removed, saying why); rank
        0's of ``ranks``."""
        directory = work_dir_for(output_dir)
        journal = cls(directory, fingerprint, ranks=ranks)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            journal._lock = open(directory / LOCK, "a+")
        except OSError as error:
            raise SaveError(f"cannot create the work folder {directory}: {error.strerror or error}") from error
        try:
            fcntl.flock(journal._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SaveError(
                f"another llmc run is writing {output_dir} (its work folder {directory.name} is "
                "locked); wait for it or stop it"
            ) from None
        previous = journal._read()
        if previous is not None and previous.get("finished"):
            changed = [key for key, value in fingerprint.items() if previous["fingerprint"].get(key) != value]
            if not resume:
                logger.warning("--no-resume: discarding %d finished layers of an earlier run", len(previous["finished"]))
            elif changed:
                logger.warning(
                    "an interrupted run for %s was found but its %s changed: starting over",
                    output_dir, " and ".join(changed),
                )
            else:
                journal.finished = list(previous["finished"])
                journal.rows = list(previous.get("rows", []))
                journal.layer_stats = list(previous.get("layer_stats", []))
                journal.modules = dict(previous.get("modules", {}))
                journal.resumed = len(journal.finished)
                logger.warning(
                    "resuming an interrupted run: %d layers already done, continuing at layer %d",
                    len(journal.finished), len(journal.finished),
                )
                return journal
        journal._clear()
        journal._write()
        return journal

    @classmethod
    def following(
        cls, output_dir: Path, fingerprint: dict[str, str], state: dict[str, Any], *, rank: int, ranks: int
    ) -> RunJournal:
        """Rank ``rank``'s view of the journal rank 0 opened (``state``, see ``state``)."""
        directory = work_dir_for(output_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SaveError(f"cannot create the work folder {directory}: {error.strerror or error}") from error
        return cls(directory, fingerprint, rank=rank, ranks=ranks, **state)

    def state(self) -> dict[str, Any]:
        """What the other ranks need of rank 0's journal to resume where it resumes."""
        return {
            "finished": self.finished, "rows": self.rows, "layer_stats": self.layer_stats,
            "modules": self.modules, "resumed": self.resumed,
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            content = json.loads((self.directory / JOURNAL).read_text())
        except (OSError, ValueError):
            return None
        if content.get("version") != VERSION:
            return None
        return content

    def _clear(self) -> None:
        for entry in self.directory.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.finished, self.rows, self.layer_stats, self.modules = [], [], [], {}

    def _write(self) -> None:
        content = {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "finished": self.finished,
            "rows": self.rows,
            "layer_stats": self.layer_stats,
            "modules": self.modules,
        }
        text = json.dumps(content, indent=1, default=_jsonable)
        _fsync_write(self.directory / JOURNAL, lambda path: path.write_text(text))

    def _part(self, index: int) -> Path:
        return self.directory / f"layer-{index:05d}.safetensors"

    def _inputs(self, index: int) -> Path:
        if self.ranks == 1:
            return self.directory / f"inputs-{index:05d}.pt"
        return self.directory / f"inputs-{index:05d}-rank{self.rank}.pt"

    def layer_done(
        self,
        index: int,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        next_inputs: Any,
        rows: list[dict[str, Any]],
        stats: dict[str, Any],
        modules: dict[str, Any],
    ) -> None:
        """Record layer ``index`` as finished: the next layer's inputs (every rank its own), its
        part, then the journal (rank 0)."""
        if next_inputs is not None:
            _fsync_write(self._inputs(index + 1), lambda path: torch.save(next_inputs, path))
        barrier(f"saving the inputs of layer {index + 1}")
        self.finished.append(name)
        self.rows.extend(rows)
        self.layer_stats.append(stats)
        self.modules[name] = modules
        if self.writes:
            entries = [entry_of_tensor(key, tensor) for key, tensor in tensors.items()]
            _fsync_write(self._part(index), lambda path: write_safetensors(path, entries, {"format": "pt"}))
            self._write()
        barrier(f"recording layer {index} in the journal")
        self._inputs(index).unlink(missing_ok=True)

    def spill(self, value: Any) -> Any:
        """``value`` (tensors in lists, tuples and dicts) read back memory-mapped from a file of
        the work folder: its pages are then the file's, which the kernel can drop and read
        again rather than run out of memory. The file is unlinked at once (the mapping keeps
        it until the tensors are freed, and nothing is left behind by a crash)."""
        self.spills += 1
        path = self.directory / f"spill-rank{self.rank}-{self.spills}.pt"
        try:
            torch.save(value, path)
            return torch.load(path, mmap=True, weights_only=True)
        except OSError as error:
            raise SaveError(f"cannot keep layer inputs in {self.directory}: {error.strerror or error}") from error
        finally:
            path.unlink(missing_ok=True)

    def next_inputs(self) -> Any:
        """The inputs of the first unfinished layer, as saved by the layer before it (mapped)."""
        path = self._inputs(len(self.finished))
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception as error:
            raise SaveError(
                f"cannot read {path} to resume the run ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                "run again with --no-resume"
            ) from error

    def part_entries(self) -> list[TensorEntry]:
        return [entry for index in range(len(self.finished)) for entry in entries_of_file(self._part(index))]

    def part_bytes(self) -> int:
        return sum(self._part(index).stat().st_size for index in range(len(self.finished)))

    def remove(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.writes:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:  # a machine of its own keeps an empty folder; rank 0 removes a shared one
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def close(self) -> None:
        """Let go of the lock (the folder stays, for the next run to resume)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
