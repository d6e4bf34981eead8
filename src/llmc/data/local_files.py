"""Read calibration rows from local json, jsonl, csv, parquet or txt files and folders.

A folder is read the way ``datasets`` reads a hub repository (a file's folder or name puts it
into a split), so a user can point at a local copy of a dataset and get the same splits. Whether
a missing name was meant as a path is decided here too, so that ``sources`` reports a typo in a
path as a missing path instead of sending it to the hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

from llmc.errors import DataError, root_cause_line

__all__ = ["BUILDER_NAMES", "SUPPORTED_SUFFIXES", "builder_for", "load_local", "looks_like_path"]

# Suffix → datasets builder; a trailing compression suffix (.gz, ...) is read transparently.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BUILDER_NAMES = frozenset(_BUILDERS.values())
SUPPORTED_SUFFIXES = ", ".join(_BUILDERS)
# File or folder names that put a file into a split other than "train", as datasets does it.
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "heldout": "heldout",
}


def builder_for(path: Path) -> str | None:
    """The ``datasets`` builder that reads ``path``, from its suffix; None for other files."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def looks_like_path(name: str) -> bool:
    """Whether a missing ``name`` was meant as a local path rather than a hub repository id.

    Hub ids are ``name`` or ``owner/name``; a known file suffix, a leading ``.``, ``/`` or ``~``,
    more than one ``/``, or an existing parent folder all say "path".
    """
    if (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    ):
        return True
    if builder_for(Path(name)) is not None:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def _split_of(file: Path, root: Path) -> str:
    """The split a file in a dataset folder belongs to: from its folder or its name, else train."""
    for part in (*file.relative_to(root).parts[:-1], file.name):
        word = re.split(r"[-_.\s]", part.lower(), maxsplit=1)[0]
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return "train"


_ROW_EXAMPLES = {
    "json": '{"text": "..."} per line',
    "csv": "a header line, then one row per line",
    "text": "one line of text per row",
}


def _holds_nothing(path: Path) -> bool:
    """An empty (or whitespace-only, uncompressed) file: the readers fail on it with internals."""
    if path.suffix in (".gz", ".bz2", ".xz", ".zst"):
        return path.stat().st_size == 0
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 4096:
        return False
    return not path.read_bytes().strip()


def load_local(path: Path, builder: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """The splits held by an existing file or folder; ``builder`` overrides the suffix."""
    if path.is_file():
        builder = builder or builder_for(path)
        if builder is None:
            raise DataError(
                f"cannot tell the format of {path}: expected a file ending in {SUPPORTED_SUFFIXES} "
                "(optionally compressed, e.g. .jsonl.gz)"
            )
        data_files: dict[str, list[str]] = {"train": [str(path)]}
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and builder_for(p) is not None
        )
        if not files:
            raise DataError(f"folder {path} holds no data files ({SUPPORTED_SUFFIXES})")
        kinds = sorted({builder_for(p) for p in files})  # type: ignore[type-var]
        if builder is None and len(kinds) > 1:
            raise DataError(
                f"folder {path} mixes {' and '.join(kinds)} files; point dataset at one file "
                "or keep one format per folder"
            )
        builder = builder or kinds[0]
        data_files = {}
        for file in files:
            if builder_for(file) == builder:
                data_files.setdefault(_split_of(file, path), []).append(str(file))
    empty = [f for files in data_files.values() for f in files if _holds_nothing(Path(f))]
    if empty:
        raise DataError(
            f"the file {empty[0]} is empty (0 bytes of data); give it rows of text "
            f"(for {builder}: {_ROW_EXAMPLES.get(builder, 'one row per line')}) or point dataset elsewhere"
        )
    try:
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
    except Exception as error:  # the readers raise many types; all mean "cannot read this file"
        raise DataError(f"cannot read {path} as {builder}: {root_cause_line(error)}") from error
