"""Calibration and evaluation data: presets, loading, tokenization and batching."""

from llmc.data.batching import make_batches, padding_token_id
from llmc.data.loading import load_calibration_data
from llmc.data.preprocessing import resolve_preprocessing_func
from llmc.data.presets import (
    asset_path,
    dataset_presets,
    get_dataset_preset,
    register_dataset_preset,
)
from llmc.data.sources import load_raw_dataset
from llmc.data.tokenization import tokenize_calibration_data

__all__ = [
    "asset_path",
    "dataset_presets",
    "get_dataset_preset",
    "load_calibration_data",
    "load_raw_dataset",
    "make_batches",
    "padding_token_id",
    "register_dataset_preset",
    "resolve_preprocessing_func",
    "tokenize_calibration_data",
]
