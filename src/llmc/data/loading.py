"""Turn ``DatasetArguments`` into calibration samples: token-id tensors of bounded length.

Two steps with a seam between them, so callers can stop after the first (evaluation wants raw
text) or start at the second (a caller that already holds a ``datasets.Dataset``):

1. ``load_raw_dataset``: find the rows, wherever they are (an object, a preset, a local file or
   folder, a hub name) and pick the split.
2. ``tokenize_calibration_data``: choose rows (seeded shuffle), preprocess, tokenize, truncate or
   pack, and stop as soon as there are enough samples. Calibration needs a few hundred samples, so
   a dataset of millions of rows must not be tokenized (or even permuted) in full.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from llmc.args import DatasetArguments
from llmc.data.presets import get_dataset_preset, is_preset_name
from llmc.errors import ArgumentError, DataError, closest, did_you_mean
from llmc.hub import hub_is_reachable, hub_offline_mode

__all__ = [
    "load_calibration_data",
    "load_raw_dataset",
    "resolve_preprocessing_func",
    "tokenize_calibration_data",
]

logger = logging.getLogger("llmc.data")

# Suffix → datasets builder; a trailing compression suffix (.gz, ...) is read transparently.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_BUILDER_NAMES = frozenset(_BUILDERS.values())
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
_SUPPORTED = ", ".join(_BUILDERS)


# Rows fewer than this are tokenized without a progress bar (it would only flicker).
_PROGRESS_MIN_ROWS = 1000
_TOKENIZE_BATCH_ROWS = 512
# Up to this many rows, a full permutation is cheap; above it rows are drawn lazily.
_FULL_PERMUTATION_MAX_ROWS = 1 << 22


# --------------------------------------------------------------------------- raw datasets


def load_raw_dataset(args: DatasetArguments, cache_dir: str | None = None) -> datasets.Dataset:
    """The rows named by ``args.dataset``/``args.dataset_path``, reduced to one split.

    Sources, tried in this order: a ``datasets.Dataset`` or ``DatasetDict`` object, a registered
    preset (``llmc:stdlib-docs``), an existing local file or folder, a hub dataset name. A name
    that looks like a path but does not exist is reported as a missing path rather than sent to
    the hub, where it would fail later with a confusing message.
    """
    source, builder = _source_of(args)
    if isinstance(source, datasets.DatasetDict):
        return _select_split(source, args.splits, "the given DatasetDict")
    if isinstance(source, datasets.Dataset):
        return _slice_single(source, args.splits, "the given Dataset")
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
        return _slice_single(get_dataset_preset(source), args.splits, f"preset {source!r}")
    path = Path(source).expanduser()
    if path.exists():
        return _select_split(_load_local(path, builder, cache_dir), args.splits, str(path))
    if builder is not None or _looks_like_path(source):
        raise DataError(
            f"dataset path {source!r} does not exist; pass an existing file or folder "
            f"({_SUPPORTED}) or a preset such as 'llmc:stdlib-docs'"
        )
    return _select_split(
        _load_from_hub(source, args.dataset_config_name, cache_dir), args.splits, repr(source)
    )


def _source_of(args: DatasetArguments) -> tuple[Any, str | None]:
    """What to load, and a builder name when the user named one (``dataset='json'``)."""
    dataset, dataset_path = args.dataset, args.dataset_path
    if dataset_path is not None:
        if dataset is None:
            return dataset_path, None
        if isinstance(dataset, str) and dataset in _BUILDER_NAMES:
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
    if isinstance(dataset, str) and dataset in _BUILDER_NAMES:
        raise ArgumentError(
            f"dataset={dataset!r} names a file format; add dataset_path=path/to/the/file",
            name="dataset_path",
        )
    return dataset, None


def _short(value: Any) -> str:
    return repr(value) if isinstance(value, str) else type(value).__name__


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(name: str) -> bool:
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
    if _builder_for(Path(name)) is not None:
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


def _load_local(path: Path, builder: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    if path.is_file():
        builder = builder or _builder_for(path)
        if builder is None:
            raise DataError(
                f"cannot tell the format of {path}: expected a file ending in {_SUPPORTED} "
                "(optionally compressed, e.g. .jsonl.gz)"
            )
        data_files: dict[str, list[str]] = {"train": [str(path)]}
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and _builder_for(p) is not None
        )
        if not files:
            raise DataError(f"folder {path} holds no data files ({_SUPPORTED})")
        kinds = sorted({_builder_for(p) for p in files})  # type: ignore[type-var]
        if builder is None and len(kinds) > 1:
            raise DataError(
                f"folder {path} mixes {' and '.join(kinds)} files; point dataset at one file "
                "or keep one format per folder"
            )
        builder = builder or kinds[0]
        data_files = {}
        for file in files:
            if _builder_for(file) == builder:
                data_files.setdefault(_split_of(file, path), []).append(str(file))
    try:
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
    except Exception as error:  # the readers raise many types; all mean "cannot read this file"
        raise DataError(f"cannot read {path} as {builder}: {_first_line(error)}") from error


def _load_from_hub(
    name: str, config_name: str | None, cache_dir: str | None
) -> datasets.DatasetDict:
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
            f"cannot load dataset {name!r} from the Hugging Face hub: {_first_line(error)}"
        ) from error
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    return loaded


def _first_line(error: BaseException) -> str:
    """One line about ``error``; the libraries wrap the useful message in generic ones."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = (str(root).strip() or type(root).__name__).splitlines()[0]
    return text if root is error else f"{type(root).__name__}: {text}"


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


def _select_split(
    dataset_dict: datasets.DatasetDict, spec: str | None, where: str
) -> datasets.Dataset:
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


def _slice_single(dataset: datasets.Dataset, spec: str | None, where: str) -> datasets.Dataset:
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
        raise DataError(f"cannot read splits={spec!r}: {_first_line(error)}") from error
    parts = [
        splits[i.splitname].select(range(i.from_, i.to))
        if (i.from_, i.to) != (0, len(splits[i.splitname]))
        else splits[i.splitname]
        for i in instructions
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------- tokenization


def resolve_preprocessing_func(func: Any) -> Callable[[dict[str, Any]], Any] | None:
    """A callable from ``preprocessing_func``; CLI users and config files can only give a string."""
    if func is None or callable(func):
        return func
    if not isinstance(func, str):
        raise ArgumentError(
            "preprocessing_func must be a callable or a 'module:function' string "
            f"(got {type(func).__name__})",
            name="preprocessing_func",
        )
    module_name, sep, attr = func.partition(":")
    if not sep or not module_name or not attr:
        raise ArgumentError(
            f"preprocessing_func {func!r} must have the form 'module:function', "
            "e.g. 'my_project.data:to_text'",
            name="preprocessing_func",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ArgumentError(
            f"cannot import module {module_name!r} named by preprocessing_func {func!r}: {error}",
            name="preprocessing_func",
        ) from error
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            choices = [n for n in dir(target) if not n.startswith("_")]
            raise ArgumentError(
                f"module {module_name!r} has no attribute {attr!r} "
                f"(preprocessing_func){did_you_mean(part, choices)}",
                name="preprocessing_func",
            )
        target = getattr(target, part)
    if not callable(target):
        raise ArgumentError(
            f"preprocessing_func {func!r} is a {type(target).__name__}, not a function",
            name="preprocessing_func",
        )
    return target


def _row_order(num_rows: int, shuffle: bool, seed: int) -> Iterator[int]:
    """Row indices in the order samples are drawn; every prefix is the same for a given seed.

    Small datasets get a full seeded permutation. Large ones draw distinct indices lazily, so a
    hub dataset of hundreds of millions of rows costs memory only for the rows actually read.
    """
    if not shuffle:
        yield from range(num_rows)
        return
    if num_rows <= _FULL_PERMUTATION_MAX_ROWS:
        generator = torch.Generator().manual_seed(seed)
        yield from torch.randperm(num_rows, generator=generator).tolist()
        return
    rng = random.Random(seed)
    seen: set[int] = set()
    while len(seen) < num_rows // 2:
        index = rng.randrange(num_rows)
        if index not in seen:
            seen.add(index)
            yield index
    rest = [i for i in range(num_rows) if i not in seen]
    rng.shuffle(rest)
    yield from rest


class _RowTokenizer:
    """Preprocess and tokenize batches of rows, checking the columns once, on the first batch."""

    def __init__(self, dataset: datasets.Dataset, tokenizer: Any, args: DatasetArguments) -> None:
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.args = args
        self.preprocess = resolve_preprocessing_func(args.preprocessing_func)
        columns = dataset.column_names
        self.pretokenized = "input_ids" in columns
        if self.preprocess is None and not self.pretokenized:
            if args.text_column not in columns:
                raise DataError(_missing_column_message(args.text_column, columns))
            self.view = dataset.select_columns([args.text_column])
        elif self.preprocess is None:
            self.view = dataset.select_columns(["input_ids"])
        else:
            self.view = dataset

    def __call__(self, indices: Sequence[int]) -> list[list[int]]:
        batch = self.view[list(indices)]
        if self.preprocess is None:
            if self.pretokenized:
                return [self._ids(v) for v in batch["input_ids"]]
            return self._tokenize(batch[self.args.text_column])
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: list[list[int] | None] = []
        texts: list[Any] = []
        positions: list[int] = []
        for row in rows:
            row = self._apply_preprocess(row)
            if "input_ids" in row:
                out.append(self._ids(row["input_ids"]))
            elif self.args.text_column in row:
                positions.append(len(out))
                out.append(None)
                texts.append(row[self.args.text_column])
            else:
                raise DataError(_missing_column_message(self.args.text_column, list(row)))
        for position, ids in zip(positions, self._tokenize(texts)):
            out[position] = ids
        return out  # type: ignore[return-value]

    def _apply_preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        result = self.preprocess(row)  # type: ignore[misc]
        if isinstance(result, str):
            return {**row, self.args.text_column: result}
        if isinstance(result, Mapping):
            return {**row, **result}
        raise DataError(
            f"preprocessing_func returned {type(result).__name__}; expected a dict of columns "
            f"or the text as a str"
        )

    def _ids(self, value: Any) -> list[int]:
        ids = (
            torch.as_tensor(value, dtype=torch.long).flatten().tolist() if value is not None else []
        )
        return ids if self.args.concatenate_data else ids[: self.args.max_seq_length]

    def _tokenize(self, texts: list[Any]) -> list[list[int]]:
        for text in texts:
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"column {self.args.text_column!r} holds {type(text).__name__} values, "
                    "expected str; pass preprocessing_func to turn each row into text"
                )
        keep = [i for i, text in enumerate(texts) if text and text.strip()]
        result: list[list[int]] = [[] for _ in texts]
        if not keep:
            return result
        kwargs: dict[str, Any] = {"verbose": False}
        if not self.args.concatenate_data:
            kwargs.update(truncation=True, max_length=self.args.max_seq_length)
        encoded = self.tokenizer([texts[i] for i in keep], **kwargs)["input_ids"]
        for i, ids in zip(keep, encoded):
            result[i] = list(ids)
        return result


def _missing_column_message(column: str, columns: Sequence[str]) -> str:
    match = closest(column, columns)
    hint = f"did you mean {match!r}? " if match else ""
    return (
        f"column {column!r} not found in the calibration data (columns: {', '.join(columns) or 'none'}); "
        f"{hint}pass text_column=... or preprocessing_func"
    )


def tokenize_calibration_data(
    dataset: datasets.Dataset, tokenizer: Any, args: DatasetArguments
) -> list[torch.Tensor]:
    """Up to ``args.num_calibration_samples`` 1-D LongTensors of at most ``max_seq_length`` ids.

    Rows are drawn in a seeded order and tokenized in batches only until enough samples exist,
    so the cost depends on the samples asked for, not on the dataset size. A column ``input_ids``
    is taken as already tokenized. With ``concatenate_data`` the documents (each with the
    special tokens the tokenizer adds, followed by eos unless it already ends with one) form one
    stream cut into samples of exactly ``max_seq_length`` ids; the last partial piece is dropped.
    Fewer samples than asked is a warning, not an error: a small dataset still calibrates.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"calibration data must be a datasets.Dataset (got {type(dataset).__name__})"
        )
    num_rows = len(dataset)
    if num_rows == 0:
        raise DataError(
            "the calibration dataset is empty (0 rows); pass a dataset with text rows, "
            "e.g. dataset='llmc:stdlib-docs'"
        )
    row_tokenizer = _RowTokenizer(dataset, tokenizer, args)
    wanted = args.num_calibration_samples
    length = args.max_seq_length
    eos = getattr(tokenizer, "eos_token_id", None)
    order = _row_order(num_rows, args.shuffle_calibration_samples, args.seed)

    samples: list[torch.Tensor] = []
    stream: list[int] = []
    rows_read = tokens_read = 0
    # Packing reads rows until enough tokens exist, an unknown number: count without a total.
    expected_rows = num_rows if args.concatenate_data else min(num_rows, wanted)
    progress = tqdm(
        total=None if args.concatenate_data else expected_rows,
        desc="tokenizing calibration data",
        unit="rows",
        disable=expected_rows < _PROGRESS_MIN_ROWS,
        leave=False,
    )
    with progress:
        while len(samples) < wanted:
            chunk = list(
                itertools.islice(order, _rows_to_read(args, samples, rows_read, tokens_read))
            )
            if not chunk:
                break
            rows_read += len(chunk)
            for ids in row_tokenizer(chunk):
                tokens_read += len(ids)
                if not ids:
                    continue
                if not args.concatenate_data:
                    samples.append(torch.tensor(ids, dtype=torch.long))
                else:
                    stream.extend(ids)
                    if eos is not None and ids[-1] != eos:
                        stream.append(eos)
                    while len(stream) >= length and len(samples) < wanted:
                        samples.append(torch.tensor(stream[:length], dtype=torch.long))
                        del stream[:length]
                if len(samples) >= wanted:
                    break
            progress.update(len(chunk))

    if not samples:
        if args.concatenate_data and tokens_read:
            raise DataError(
                f"the calibration text has only {tokens_read} tokens, fewer than one sample of "
                f"max_seq_length={length}; lower max_seq_length or set concatenate_data=False"
            )
        what = "input_ids" if row_tokenizer.pretokenized else f"column {args.text_column!r}"
        raise DataError(
            f"no calibration samples: all {rows_read} rows have empty {what}; "
            "pass a dataset with text or set text_column to the column that holds it"
        )
    if len(samples) < wanted:
        logger.warning(
            "using %d calibration samples: the data gives only %d of the %d asked for "
            "(num_calibration_samples)",
            len(samples),
            len(samples),
            wanted,
        )
    return samples


def _rows_to_read(
    args: DatasetArguments, samples: list[torch.Tensor], rows_read: int, tokens_read: int
) -> int:
    """How many more rows to tokenize: what is missing plus some slack for empty rows."""
    missing = args.num_calibration_samples - len(samples)
    if args.concatenate_data:
        missing_tokens = missing * args.max_seq_length
        per_row = tokens_read / rows_read if rows_read and tokens_read else 64.0
        missing = math.ceil(missing_tokens / max(per_row, 1.0))
    slack = max(8, missing // 8)
    return max(1, min(missing + slack, _TOKENIZE_BATCH_ROWS))


def load_calibration_data(
    args: DatasetArguments, tokenizer: Any, cache_dir: str | None = None
) -> list[torch.Tensor]:
    """``load_raw_dataset`` then ``tokenize_calibration_data``: what ``oneshot`` calls."""
    dataset = load_raw_dataset(args, cache_dir=cache_dir)
    return tokenize_calibration_data(dataset, tokenizer, args)
