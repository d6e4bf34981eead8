"""What AWQ and SmoothQuant gather from one pass of the calibration batches through a layer.

Per mapping, a statistic of the group's activation over every calibration token (AWQ: mean
``|x|`` per channel; SmoothQuant: max ``|x|``), both ``llmc.statistics.Statistic``\\ s with
padding left out by ``real_tokens``. AWQ also keeps a *bounded* sample of the inputs of each
mapping's parent module (the positional and keyword arguments it was called with, whole
batches until ``max_tokens`` real tokens), on ``device``: the grid search re-runs the parent on
them, so memory is one sample per parent, never a copy of the layer per grid point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs
import torch

from llmc.statistics import real_tokens

__all__ = ["AbsMax", "MeanAbs", "ParentSample", "computing_in", "detached_to"]


def computing_in(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The pipeline's autocast (``context.compute_dtype``) for a forward the plugin runs itself,
    so a module called on inputs the calibration pass gathered computes as it did there."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@attrs.define
class MeanAbs:
    """Running mean of ``|x|`` per channel (float32 sums; ``finalize() -> [channels]``)."""

    total: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = real_tokens(x.detach(), mask)  # [tokens, channels]
        sums = x.abs().sum(dim=0, dtype=torch.float32)
        self.total = sums if self.total is None else self.total + sums
        self.tokens += x.shape[0]

    def merge(self, other: MeanAbs) -> None:
        if other.total is not None:
            self.total = other.total.clone() if self.total is None else self.total + other.total.to(self.total.device)
        self.tokens += other.tokens

    def finalize(self) -> torch.Tensor | None:
        return None if self.total is None or not self.tokens else self.total / self.tokens


@attrs.define
class AbsMax:
    """Running max of ``|x|`` per channel (``finalize() -> [channels]``)."""

    value: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = real_tokens(x.detach(), mask)
        if not x.shape[0]:
            return
        batch = x.abs().amax(dim=0).float()
        self.value = batch if self.value is None else torch.maximum(self.value, batch)
        self.tokens += x.shape[0]

    def merge(self, other: AbsMax) -> None:
        if other.value is not None:
            self.value = other.value.clone() if self.value is None else torch.maximum(self.value, other.value.to(self.value.device))
        self.tokens += other.tokens

    def finalize(self) -> torch.Tensor | None:
        return self.value


def detached_to(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor inside tuples, lists and dicts detached (and moved)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(device) if device is not None else value
    if isinstance(value, tuple):
        return tuple(detached_to(item, device) for item in value)
    if isinstance(value, list):
        return [detached_to(item, device) for item in value]
    if isinstance(value, dict):
        return {key: detached_to(item, device) for key, item in value.items()}
    return value


@attrs.define
class ParentSample:
    """The calls of one module kept for the search: ``(args, kwargs, attention mask)``."""

    max_tokens: int | None
    device: torch.device | None
    calls: list[tuple[tuple, dict, torch.Tensor | None]] = attrs.field(factory=list)
    tokens: int = 0

    def full(self) -> bool:
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def hook(self, mask: Callable[[], torch.Tensor | None]) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.full() or not args and not kwargs:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            current = mask()
            if isinstance(x, torch.Tensor):
                self.tokens += real_tokens(x, current).shape[0]
            self.calls.append((detached_to(args, self.device), detached_to(kwargs, self.device), current))

        return keep

    def nbytes(self) -> int:
        total = 0

        def add(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, (tuple, list)):
                for item in value:
                    add(item)
            elif isinstance(value, dict):
                for item in value.values():
                    add(item)

        for args, kwargs, _ in self.calls:
            add(args)
            add(kwargs)
        return total
