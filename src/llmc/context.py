"""State shared by core and the modifiers during one run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

__all__ = ["RunContext"]


@attrs.define(kw_only=True)
class RunContext:
    """What a modifier's lifecycle hooks can see and record.

    ``report`` collects per-module results (``context.record(...)``) that end up in the run
    report and its plot; ``attention_mask`` is set by the pipeline for each calibration batch so
    statistics can skip padded tokens.

    ``forward_layer`` is set while a block is being calibrated (from ``llmc_layer_start`` to the
    end of ``llmc_layer_end``): calling it runs every calibration batch through the block again,
    as it is now, so a modifier can compress part of a block and collect fresh statistics for
    the rest (GPTQ's true-sequential order). A hook may raise ``llmc.pipeline.StopLayerForward``
    to cut a batch's forward short once it has what it needs.

    ``compute_dtype``, when set, is the dtype the pipeline's forward passes compute in
    (``torch.autocast``); statistics a hook gathers should not assume their inputs' dtype.

    ``stage_modifiers`` holds every modifier of the one-shot stage being run, in recipe order (the
    modifier whose run state is called among them), so a modifier can take settings from a
    sibling: ``AWQModifier`` searches with the scheme of the quantizer that follows it.

    ``teacher`` is set by ``train`` when a modifier ``requires_teacher``: calling it returns the
    ``distill_teacher`` model, in eval mode with gradients off, on ``distill_teacher_device``
    (a path or hub name is loaded on each call: call it once, in ``llmc_train_start``, and
    drop the model in ``llmc_train_end``).
    """

    model: torch.nn.Module
    device: torch.device
    tokenizer: Any = None
    attention_mask: torch.Tensor | None = None
    layer_names: list[str] = attrs.field(factory=list)
    forward_layer: Callable[[], None] | None = None
    compute_dtype: torch.dtype | None = None
    teacher: Callable[[], torch.nn.Module] | None = None
    stage_modifiers: tuple[Any, ...] = ()
    # set by ``train``: where fine-tuning is, so scheduled modifiers can follow their schedule
    step: int = 0
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    report: list[dict[str, Any]] = attrs.field(factory=list)

    def record(self, *, modifier: str, module: str, **values: Any) -> None:
        """Add one row (a module a modifier changed, with its measurements) to the run report."""
        self.report.append({"modifier": modifier, "module": module, **values})
