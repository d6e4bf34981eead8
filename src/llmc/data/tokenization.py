"""Make calibration samples from a ``datasets.Dataset``: draw rows, tokenize, pack, stop.

The second of the two data steps (the first is ``sources``), and where a caller that already
holds a ``datasets.Dataset`` starts. Calibration needs a few hundred samples, so rows are read
in the seeded order of ``row_order`` a batch at a time and only until there are enough samples:
the cost follows the samples asked for, not the dataset's size.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from llmc.args import DatasetArguments
from llmc.data.row_order import row_order
from llmc.data.row_tokenizer import RowTokenizer
from llmc.errors import DataError

__all__ = ["tokenize_calibration_data"]

logger = logging.getLogger("llmc.data")

# Rows fewer than this are tokenized without a progress bar (it would only flicker).
_PROGRESS_MIN_ROWS = 1000
_TOKENIZE_BATCH_ROWS = 512


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
    row_tokenizer = RowTokenizer(dataset, tokenizer, args)
    wanted = args.num_calibration_samples
    if not args.concatenate_data and wanted > num_rows:
        logger.warning(
            "num_calibration_samples=%d but the dataset has %d rows: at most %d samples "
            "(one per row; concatenate_data=True packs rows into more samples)",
            wanted, num_rows, num_rows,
        )
    length = args.max_seq_length
    eos = getattr(tokenizer, "eos_token_id", None)
    order = row_order(num_rows, args.shuffle_calibration_samples, args.seed)

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
