"""Reduce loaded data to the one split ``splits=`` names (``'train[:10%]+test'``).

Calibration takes one ``datasets.Dataset``; every source (a ``DatasetDict``, a folder, a hub
repository, a preset that is already one split) goes through here, so ``splits`` means the
same everywhere and a wrong split name is reported with the names that exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import datasets

from llmc.errors import DataError, did_you_mean, root_cause_line

__all__ = ["select_split", "slice_single"]

_SPLIT_SPEC = re.compile(r"^\s*([\w.-]+)\s*(\[[^\]]*\])?\s*$")


def _split_names(spec: str) -> list[str]:
    names = []
    for part in spec.split("+"):
        match = _SPLIT_SPEC.match(part)
        if match is None:
            raise DataError(
                f"cannot read splits={spec!r}: expected a split name with an optional slice, "
                "such as 'train', 'train[:10%]' or 'train[100:600]+test'"
            )
        names.append(match.group(1))
    return names


def select_split(
    dataset_dict: datasets.DatasetDict, spec: str | None, where: str
) -> datasets.Dataset:
    """The split ``spec`` names; without one, 'train', or the only split there is."""
    available = list(dataset_dict.keys())
    if spec is None:
        if "train" in dataset_dict:
            return dataset_dict["train"]
        if len(available) == 1:
            return dataset_dict[available[0]]
        raise DataError(
            f"{where} has no 'train' split; choose one with splits=... "
            f"(available splits: {', '.join(available)})"
        )
    for name in _split_names(spec):
        if name not in dataset_dict:
            raise DataError(
                f"unknown split {name!r} in {where}{did_you_mean(name, available)} "
                f"(available splits: {', '.join(available)})"
            )
    return _read_instruction(spec, {n: dataset_dict[n] for n in available})


def slice_single(dataset: datasets.Dataset, spec: str | None, where: str) -> datasets.Dataset:
    """Apply ``splits`` to a dataset that is already one split.

    The split name must match the dataset's own split when it has one (a preset loaded as
    'train' asked for 'test' is a mistake worth reporting); the slice part is applied.
    """
    if spec is None:
        return dataset
    own = str(dataset.split) if dataset.split is not None else None
    names = _split_names(spec)
    for name in names:
        if own is not None and name != own:
            raise DataError(
                f"unknown split {name!r} in {where}: it is one split, {own!r}; "
                f"use splits={own!r} (with an optional slice) or another dataset"
            )
    return _read_instruction(spec, {name: dataset for name in names})


def _read_instruction(spec: str, splits: Mapping[str, datasets.Dataset]) -> datasets.Dataset:
    try:
        instructions = datasets.ReadInstruction.from_spec(spec.replace(" ", "")).to_absolute(
            {name: len(ds) for name, ds in splits.items()}
        )
    except (ValueError, AssertionError) as error:
        raise DataError(f"cannot read splits={spec!r}: {root_cause_line(error)}") from error
    parts = [
        splits[i.splitname].select(range(i.from_, i.to))
        if (i.from_, i.to) != (0, len(splits[i.splitname]))
        else splits[i.splitname]
        for i in instructions
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
