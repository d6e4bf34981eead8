"""The protocol of a one-run script (``ours_oneshot.py``, ``peer_oneshot.py``) with its driver.

A child reads the calibration chunks from one safetensors file, hands both tools the same
``datasets.Dataset`` (so neither tokenizes, pads or truncates anything), and prints, as the last
line of its output, one JSON object with what it measured itself. The driver runs it under
``/usr/bin/time -v`` and reads that line back (``last_json_line``). A child that cannot run a
recipe because a plugin is missing exits with ``EXIT_PLUGIN_MISSING``, so that the driver
reports the configuration as skipped instead of failed.

torch and datasets only: the peer's venv imports this module too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from benchlib.env import PROCESS_STARTED

EXIT_PLUGIN_MISSING = 3

__all__ = [
    "EXIT_PLUGIN_MISSING",
    "add_arguments",
    "calibration_arguments",
    "last_json_line",
    "load_chunks",
    "print_report",
    "reorder",
    "run_facts",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--chunks``, the arguments every child takes from the driver."""
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument(
        "--chunks", required=True, help="safetensors file with input_ids [n, seq_len]"
    )
    parser.add_argument(
        "--order-seed",
        type=int,
        help="calibrate on the same chunks in this seed's order (default: the file's)",
    )


def load_chunks(path: str | os.PathLike[str], order_seed: int | None = None) -> Any:
    """The ``[n, seq_len]`` int64 token ids written by ``benchlib.data.calibration_chunks``,
    in the file's order or in ``order_seed``'s (``reorder``)."""
    import torch
    from safetensors.torch import load_file

    return reorder(load_file(str(path))["input_ids"].to(torch.long), order_seed)


def reorder(chunks: Any, order_seed: int | None) -> Any:
    """The same chunks in a seeded order, the same for both tools' venvs (None: as given).

    The Hessians then differ only by float summation order, which is what moves a run on a
    real model by up to a few percent: the spread over orders is the noise a comparison of
    two tools has to beat.
    """
    import torch

    if order_seed is None:
        return chunks
    return chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(order_seed))]


def calibration_arguments(chunks: Any) -> dict[str, Any]:
    """The calibration arguments both tools' oneshot take, by the same names, for ``chunks``.

    ``dataset`` holds ``input_ids`` and an all-ones ``attention_mask``, one row per chunk; every
    chunk is used, at its full length, in the file's order: neither tool shuffles, because the
    order alone moves a GPTQ or SparseGPT result on a real model by up to ~1 % in perplexity
    (float sums in another order flip near-tied rounding and act-order decisions, and the
    layers after compound them), more than the differences being compared.
    """
    import torch
    from datasets import Dataset

    samples, seq_len = chunks.shape
    dataset = Dataset.from_dict(
        {"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()}
    )
    return {
        "dataset": dataset,
        "num_calibration_samples": int(samples),
        "max_seq_length": int(seq_len),
        "shuffle_calibration_samples": False,
    }


def run_facts(tool: str, chunks: Any, **facts: Any) -> dict[str, Any]:
    """What a child's report starts with: the tool, torch and its threads, the data's shape."""
    import torch

    samples, seq_len = chunks.shape
    return {
        "tool": tool,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "samples": int(samples),
        "seq_len": int(seq_len),
        **facts,
    }


def print_report(facts: dict[str, Any], imported: float | None, **measured: Any) -> None:
    """Print the child's last line: its facts, ``import_s`` (when given), what it measured, ``total_s``."""
    line = dict(facts)
    if imported is not None:
        line["import_s"] = round(imported - PROCESS_STARTED, 2)
    line.update(measured)
    line["total_s"] = round(time.perf_counter() - PROCESS_STARTED, 2)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports: ranks' lines would interleave
        return
    print(json.dumps(line), flush=True)


def last_json_line(log_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last line of a log that parses as a JSON object (a child's own report)."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None
