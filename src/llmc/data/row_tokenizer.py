"""Turn a batch of dataset rows into token ids: preprocess, tokenize, truncate.

Rows arrive in three shapes (a text column, an ``input_ids`` column that is already tokenized,
or anything a ``preprocessing_func`` turns into one of those), and the shape is decided once
from the columns, so a missing column fails before the first batch is tokenized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from llmc.args import DatasetArguments
from llmc.data.preprocessing import resolve_preprocessing_func
from llmc.errors import DataError, closest

__all__ = ["RowTokenizer"]


class RowTokenizer:
    """Preprocess and tokenize batches of rows, checking the columns once, on the first batch.

    Without ``concatenate_data`` each row is truncated to ``max_seq_length`` ids here; with it,
    rows are kept whole for the packing that follows.
    """

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
        """The ids of the rows at ``indices``, in that order; an empty list for an empty row."""
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
