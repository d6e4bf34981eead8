"""Write safetensors files one tensor at a time, from memory or from other safetensors files.

``safetensors.torch.save_file`` needs every tensor of a shard in memory at once and copies
each into a Python ``bytes`` first, so saving a 5 GB shard costs up to 10 GB of RAM: the
host-memory peak users hit at the end of a long run. Here a shard is written tensor by tensor:
an in-memory tensor's bytes go straight from its storage to the file, and a tensor already
written to a part file (a streamed run's finished layer) is copied from that file in chunks,
never loaded. The files are byte-for-byte what ``save_file`` writes for the same tensors
(tested against the installed safetensors): the header's tensor order is taken from the
library itself, by serializing empty tensors of the same names and dtypes, so it cannot drift
from the library's rule.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs
import torch
from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES
from safetensors.torch import save

__all__ = ["TensorEntry", "entries_of_file", "entry_of_tensor", "write_safetensors"]

_COPY_CHUNK = 8 << 20
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


@attrs.frozen
class TensorEntry:
    """One tensor to write: its name, safetensors dtype, shape and where its bytes are.

    Exactly one of ``tensor`` (in memory) and ``source`` (a file, with the byte range of the
    tensor's data in it) is set.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None
    source: Path | None = None
    offset: int = 0

    def write_to(self, handle: BinaryIO) -> None:
        if self.tensor is not None:
            if self.nbytes:
                data = self.tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                handle.write(memoryview(data.numpy()))
            return
        with open(self.source, "rb") as source:  # type: ignore[arg-type]
            source.seek(self.offset)
            left = self.nbytes
            while left:
                chunk = source.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise OSError(f"{self.source} ends inside tensor {self.name}")
                handle.write(chunk)
                left -= len(chunk)


def entry_of_tensor(name: str, tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry(
        name=name,
        dtype=_DTYPE_NAMES[tensor.dtype],
        shape=tuple(tensor.shape),
        nbytes=tensor.numel() * tensor.element_size(),
        tensor=tensor,
    )


def entries_of_file(path: str | os.PathLike[str]) -> list[TensorEntry]:
    """The tensors of a safetensors file, as entries that copy their bytes from it."""
    path = Path(path)
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    data_start = 8 + header_size
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(
            TensorEntry(
                name=name, dtype=info["dtype"], shape=tuple(info["shape"]), nbytes=end - begin,
                source=path, offset=data_start + begin,
            )
        )
    return entries


def _library_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """The entries in the order safetensors lays tensors out, asked of safetensors itself."""
    by_name = {entry.name: entry for entry in entries}
    empty = {
        entry.name: torch.empty(0, dtype=_SAFETENSORS_DTYPES[entry.dtype]) for entry in entries
    }
    blob = save(empty)
    (header_size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_size])
    return [by_name[name] for name in header if name != "__metadata__"]


def _header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: str | os.PathLike[str],
    entries: Iterable[TensorEntry],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``entries`` as one safetensors file at ``path`` (what ``save_file`` would write)."""
    entries = list(entries)
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in one file: {sorted(n for n in set(names) if names.count(n) > 1)}")
    ordered = _library_order(entries)
    with open(path, "wb") as handle:
        handle.write(_header(ordered, metadata))
        for entry in ordered:
            entry.write_to(handle)
