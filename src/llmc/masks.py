"""Sparsity masks that later modifiers must respect.

A pruning modifier marks which weights it kept; a quantizer that runs after it (GPTQ in a
"2:4 then W4A16" recipe) reads the mask and keeps pruned weights at exactly zero instead of
refilling them through its error updates. The mask is a non-persistent buffer: it moves with
the module between devices but is never written into a checkpoint.
"""

from __future__ import annotations

import torch

__all__ = ["MASK_BUFFER", "apply_mask_", "set_sparsity_mask_", "sparsity_mask"]

MASK_BUFFER = "llmc_sparsity_mask"


def set_sparsity_mask_(module: torch.nn.Module, kept: torch.Tensor) -> None:
    """Record ``kept`` (bool, shaped like the weight, True = weight may be non-zero)."""
    kept = kept.to(device=module.weight.device, dtype=torch.bool)
    if kept.shape != module.weight.shape:
        raise ValueError(f"mask shape {tuple(kept.shape)} differs from weight {tuple(module.weight.shape)}")
    if hasattr(module, MASK_BUFFER):
        getattr(module, MASK_BUFFER).copy_(kept)
    else:
        module.register_buffer(MASK_BUFFER, kept, persistent=False)


def sparsity_mask(module: torch.nn.Module) -> torch.Tensor | None:
    """The mask a pruning modifier left on ``module``, if any."""
    return getattr(module, MASK_BUFFER, None)


def apply_mask_(module: torch.nn.Module) -> None:
    """Zero the weights the mask prunes (after an update that may have refilled them)."""
    mask = sparsity_mask(module)
    if mask is not None:
        with torch.no_grad():
            module.weight.mul_(mask)
