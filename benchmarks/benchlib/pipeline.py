"""llmc's layer-by-layer pipeline on calibration chunks, and the calibration floor.

The floor is the pipeline with a run state that asks for every layer's calibration pass and
changes nothing: load, capture of the first layer's inputs, then per layer one calibration pass
and one propagation pass, no save. Any calibrated recipe of ours pays at least this, so a
method's cost is what comes on top of it. ``ours_oneshot.py --floor`` and ``gptq_floor.py``
measure it with the same code as ``oneshot``: llmc's loader, batching and pipeline.

Imports llmc: for the scripts of llmc's venv only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from llmc import ModelArguments, PluginError, RunContext, hookimpl
from llmc.data import make_batches, padding_token_id
from llmc.models import calibration_dtype, load_model, load_tokenizer
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.plugins import load_registry

__all__ = ["Calibration", "CalibrationOnly", "calibrate", "load", "missing_plugin", "run_floor"]


class CalibrationOnly:
    """A run state that asks for every layer's calibration pass and changes nothing."""

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):  # noqa: ARG002
        return True


@attrs.define
class Calibration:
    """A calibrated model and what the run took (``load_s``: model, tokenizer and batches)."""

    model: torch.nn.Module
    context: RunContext
    load_s: float
    pipeline_s: float
    layer_s: dict[str, float]


def load(
    model_dir: str | os.PathLike[str],
    *,
    precision: str = "auto",
    calibration_precision: str = "auto",
) -> RunContext:
    """The model and tokenizer loaded as ``oneshot`` loads them, in a fresh run context."""
    model_args = ModelArguments(
        model=str(model_dir), precision=precision, calibration_precision=calibration_precision
    )
    model = load_model(model_args)
    return RunContext(
        model=model,
        device=next(model.parameters()).device,
        tokenizer=load_tokenizer(model_args, model),
        compute_dtype=calibration_dtype(model_args, model),
    )


def calibrate(
    model_dir: str | os.PathLike[str],
    chunks: torch.Tensor | None,
    make_run_state: Callable[[RunContext], object],
    *,
    precision: str = "auto",
    calibration_precision: str = "auto",
    batch_size: int = 1,
) -> Calibration:
    """Load the model as ``oneshot`` does and run the pipeline with one run state over ``chunks``.

    ``chunks`` (``[n, seq_len]`` token ids) become batches as in ``oneshot`` (batch size 1 by
    default, no padding needed); None runs a data-free modifier. ``make_run_state`` gets the run
    context, as a modifier's ``start`` does.
    """
    started = time.perf_counter()
    context = load(model_dir, precision=precision, calibration_precision=calibration_precision)
    batches = None
    if chunks is not None:
        batches = make_batches(list(chunks), batch_size, padding_token_id(context.tokenizer))
    loaded = time.perf_counter()
    lifecycle = make_lifecycle([make_run_state(context)])
    pipeline = LayerwisePipeline(
        model=context.model, context=context, lifecycle=lifecycle, show_progress=False
    )
    with torch.no_grad():
        pipeline.run(batches)
    return Calibration(
        model=context.model,
        context=context,
        load_s=loaded - started,
        pipeline_s=time.perf_counter() - loaded,
        layer_s=dict(pipeline.timings),
    )


def run_floor(
    model_dir: str | os.PathLike[str],
    chunks: torch.Tensor,
    *,
    precision: str = "auto",
    calibration_precision: str = "auto",
    batch_size: int = 1,
) -> dict[str, Any]:
    """The floor's phase timings: ``load_s``, ``pipeline_s``, ``oneshot_s`` (both) and per-layer ``layer_s``."""
    run = calibrate(
        model_dir,
        chunks,
        lambda context: CalibrationOnly(),
        precision=precision,
        calibration_precision=calibration_precision,
        batch_size=batch_size,
    )
    return {
        "load_s": round(run.load_s, 2),
        "pipeline_s": round(run.pipeline_s, 2),
        "oneshot_s": round(run.load_s + run.pipeline_s, 2),
        "layer_s": {name: round(seconds, 2) for name, seconds in run.layer_s.items()},
    }


def missing_plugin(modifiers: tuple[str, ...]) -> str | None:
    """None when every modifier is provided by an installed plugin, else what to install."""
    registry = load_registry()
    for modifier in modifiers:
        try:
            registry.resolve(modifier)
        except PluginError as error:
            return str(error)
    return None
