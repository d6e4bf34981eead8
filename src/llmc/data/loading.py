"""Turn ``DatasetArguments`` into calibration samples: token-id tensors of bounded length.

Two steps with a seam between them, so callers can stop after the first (evaluation wants raw
text) or start at the second (a caller that already holds a ``datasets.Dataset``):

1. ``sources.load_raw_dataset``: find the rows, wherever they are (an object, a preset, a local
   file or folder, a hub name) and pick the split.
2. ``tokenization.tokenize_calibration_data``: choose rows (seeded order), preprocess, tokenize,
   truncate or pack, and stop as soon as there are enough samples.

This module joins them for ``oneshot`` and keeps the names older imports from it expect.
"""

from __future__ import annotations

from typing import Any

import torch

from llmc.args import DatasetArguments
from llmc.data.preprocessing import resolve_preprocessing_func
from llmc.data.sources import load_raw_dataset
from llmc.data.tokenization import tokenize_calibration_data

__all__ = [
    "load_calibration_data",
    "load_raw_dataset",
    "resolve_preprocessing_func",
    "tokenize_calibration_data",
]


def load_calibration_data(
    args: DatasetArguments, tokenizer: Any, cache_dir: str | None = None
) -> list[torch.Tensor]:
    """``load_raw_dataset`` then ``tokenize_calibration_data``: what ``oneshot`` calls."""
    dataset = load_raw_dataset(args, cache_dir=cache_dir)
    return tokenize_calibration_data(dataset, tokenizer, args)
