"""Group calibration samples into padded batches for the forward passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmc.errors import ArgumentError

__all__ = ["make_batches", "padding_token_id"]


def padding_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else 0.

    Many causal-LM tokenizers (Llama among them) define no pad token. Padded positions are masked
    out of attention, so any valid id works; eos is the conventional choice.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def make_batches(
    samples: Sequence[torch.Tensor], batch_size: int, pad_token_id: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids [B, L]`` and ``attention_mask [B, L]``, right-padded.

    Samples are sorted by length, longest first, before grouping, so that a batch holds samples
    of similar length and padding (wasted compute, and a shift of calibration statistics towards
    pad positions for layers that ignore the mask) stays small. Ties keep their input order, so
    the same samples always give the same batches; the longest batch comes first, so an
    out-of-memory error shows up at once rather than at the end of a layer.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ArgumentError(
            f"'batch_size' must be a positive integer (got {batch_size!r})", name="batch_size"
        )
    pad = 0 if pad_token_id is None else int(pad_token_id)
    flat = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples]
    order = sorted(range(len(flat)), key=lambda i: (-flat[i].numel(), i))
    batches = []
    for start in range(0, len(order), batch_size):
        group = [flat[i] for i in order[start : start + batch_size]]
        width = max(s.numel() for s in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)  # [B, L]
        for row, sample in enumerate(group):
            input_ids[row, : sample.numel()] = sample
            attention_mask[row, : sample.numel()] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches
