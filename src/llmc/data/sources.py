"""Find the rows ``DatasetArguments`` name, wherever they are, reduced to one split.

The first of the two data steps (the second is ``tokenization``), and the one evaluation uses on
its own: it wants raw text, not calibration samples.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import datasets

from llmc.args import DatasetArguments
from llmc.data.local_files import BUILDER_NAMES, SUPPORTED_SUFFIXES, load_local, looks_like_path
from llmc.data.presets import get_dataset_preset, is_preset_name
from llmc.data.splits import select_split, slice_single
from llmc.errors import ArgumentError, DataError, root_cause_line
from llmc.hub import hub_is_reachable, hub_offline_mode

__all__ = ["load_raw_dataset"]


def load_raw_dataset(args: DatasetArguments, cache_dir: str | None = None) -> datasets.Dataset:
    """The rows named by ``args.dataset``/``args.dataset_path``, reduced to one split.

    Sources, tried in this order: a ``datasets.Dataset`` or ``DatasetDict`` object, a registered
    preset (``llmc:stdlib-docs``), an existing local file or folder, a hub dataset name. A name
    that looks like a path but does not exist is reported as a missing path rather than sent to
    the hub, where it would fail later with a confusing message.
    """
    source, builder = _source_of(args)
    if isinstance(source, datasets.DatasetDict):
        return select_split(source, args.splits, "the given DatasetDict")
    if isinstance(source, datasets.Dataset):
        return slice_single(source, args.splits, "the given Dataset")
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(
            "streaming datasets are not supported for calibration; load the rows first "
            "(datasets.load_dataset(..., streaming=False)) or take a few with "
            "Dataset.from_list(list(stream.take(n)))"
        )
    if not isinstance(source, str):
        raise DataError(
            "dataset must be a path, a hub name, a preset name or a datasets.Dataset "
            f"(got {type(source).__name__})"
        )
    if builder is None and is_preset_name(source):
        return slice_single(get_dataset_preset(source), args.splits, f"preset {source!r}")
    path = Path(source).expanduser()
    if path.exists():
        return select_split(load_local(path, builder, cache_dir), args.splits, str(path))
    if builder is not None or looks_like_path(source):
        raise DataError(
            f"dataset path {source!r} does not exist; pass an existing file or folder "
            f"({SUPPORTED_SUFFIXES}) or a preset such as 'llmc:stdlib-docs'"
        )
    return select_split(
        _load_from_hub(source, args.dataset_config_name, cache_dir), args.splits, repr(source)
    )


def _source_of(args: DatasetArguments) -> tuple[Any, str | None]:
    """What to load, and a builder name when the user named one (``dataset='json'``)."""
    dataset, dataset_path = args.dataset, args.dataset_path
    if dataset_path is not None:
        if dataset is None:
            return dataset_path, None
        if isinstance(dataset, str) and dataset in BUILDER_NAMES:
            return dataset_path, dataset
        raise ArgumentError(
            f"both dataset={_short(dataset)} and dataset_path={dataset_path!r} were given; "
            "pass only one (dataset_path goes with dataset='json', 'csv', 'parquet' or 'text')",
            name="dataset_path",
        )
    if dataset is None:
        raise ArgumentError(
            "no calibration data given; pass dataset= a local file or folder, a preset such as "
            "'llmc:stdlib-docs', a hub name or a datasets.Dataset",
            name="dataset",
        )
    if isinstance(dataset, str) and dataset in BUILDER_NAMES:
        raise ArgumentError(
            f"dataset={dataset!r} names a file format; add dataset_path=path/to/the/file",
            name="dataset_path",
        )
    return dataset, None


def _short(value: Any) -> str:
    return repr(value) if isinstance(value, str) else type(value).__name__


def _load_from_hub(
    name: str, config_name: str | None, cache_dir: str | None
) -> datasets.DatasetDict:
    """A hub dataset, from the local cache alone when the hub cannot be reached."""
    offline_message = (
        f"cannot load dataset {name!r} from the Hugging Face hub (offline or unreachable); "
        "pass a local file with dataset=path/to/data.jsonl or a preset such as 'llmc:stdlib-docs'"
    )
    reachable = hub_is_reachable()
    try:
        with contextlib.nullcontext() if reachable else hub_offline_mode():
            loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except ConnectionError as error:
        raise DataError(offline_message) from error
    except Exception as error:  # DatasetNotFoundError, missing config name, bad files, ...
        if not reachable:
            raise DataError(offline_message) from error
        raise DataError(
            f"cannot load dataset {name!r} from the Hugging Face hub: {root_cause_line(error)}"
        ) from error
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    return loaded
