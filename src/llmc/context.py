"""State shared by core and the modifiers during one run."""

from __future__ import annotations

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
    """

    model: torch.nn.Module
    device: torch.device
    tokenizer: Any = None
    attention_mask: torch.Tensor | None = None
    layer_names: list[str] = attrs.field(factory=list)
    report: list[dict[str, Any]] = attrs.field(factory=list)

    def record(self, *, modifier: str, module: str, **values: Any) -> None:
        """Add one row (a module a modifier changed, with its measurements) to the run report."""
        self.report.append({"modifier": modifier, "module": module, **values})
