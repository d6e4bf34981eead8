"""Sparsity masks that later modifiers must respect.

A pruning modifier marks which weights it kept; a quantizer that runs after it (GPTQ in a
"2:4 then W4A16" recipe) reads the mask and keeps pruned weights at exactly zero instead of
refilling them through its error updates. The mask is a non-persistent buffer: it moves with
the module between devices but is never written into a checkpoint. It is stored as bits (eight
weights to a byte along the input dimension): every pruned module keeps its mask until the run
ends, and as bools the masks of a model held in memory weigh half of its bf16 weights (113 MB
of SmolLM2-135M's 270 MB); ``sparsity_mask`` unpacks one module's on demand.

A streamed run releases each layer once it is written, masks included; what the checkpoint's
sparsity record needs of a mask (how many weights it prunes, its N:M structure) is kept as a
``MaskSummary`` on the module (``summarize_mask_``), and ``mask_summary`` reads either.
"""

from __future__ import annotations

import attrs
import torch

__all__ = [
    "MASK_BUFFER",
    "MaskSummary",
    "apply_mask_",
    "clear_sparsity_mask_",
    "mask_structure",
    "mask_summary",
    "restore_mask_summary_",
    "set_sparsity_mask_",
    "sparsity_mask",
    "summarize_mask_",
]

MASK_BUFFER = "llmc_sparsity_mask"
_SUMMARY = "llmc_sparsity_mask_summary"
_GROUP_SIZES = (4, 8, 16, 32, 64, 128)


@attrs.frozen
class MaskSummary:
    """What a mask prunes: the number of weights, and (N, M) when it is N:M structured."""

    pruned: int
    structure: tuple[int, int] | None


def mask_structure(kept: torch.Tensor) -> tuple[int, int] | None:
    """(N, M) when every group of M consecutive columns of every row keeps exactly N < M."""
    kept = kept.reshape(-1, kept.shape[-1])  # fused experts [experts, rows, cols]: rows of all
    rows, cols = kept.shape
    for group_m in _GROUP_SIZES:
        if cols % group_m:
            continue
        counts = kept.reshape(rows, cols // group_m, group_m).sum(dim=-1)  # [rows, groups]
        keep_n = int(counts.max())
        if keep_n < group_m and int(counts.min()) == keep_n:
            return keep_n, group_m
    return None


def mask_summary(module: torch.nn.Module) -> MaskSummary | None:
    """The summary of ``module``'s mask, live or kept from before its layer was released."""
    kept = sparsity_mask(module)
    if kept is not None and kept.device.type != "meta":
        return MaskSummary(int((~kept).sum()), mask_structure(kept))
    return getattr(module, _SUMMARY, None)


def restore_mask_summary_(module: torch.nn.Module, summary: MaskSummary) -> None:
    """Put back a summary kept by an interrupted streamed run (``llmc.resume``)."""
    object.__setattr__(module, _SUMMARY, summary)


def summarize_mask_(module: torch.nn.Module) -> None:
    """Keep the summary of ``module``'s mask on it, before the mask's memory is released."""
    summary = mask_summary(module)
    if summary is not None:
        object.__setattr__(module, _SUMMARY, summary)


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=device)


def _pack_bits(kept: torch.Tensor) -> torch.Tensor:
    """``kept`` [..., cols] as uint8 [..., ceil(cols / 8)]; bit b of byte j is column 8j + b."""
    padding = -kept.shape[-1] % 8
    if padding:
        kept = torch.nn.functional.pad(kept, (0, padding))
    octets = kept.reshape(*kept.shape[:-1], -1, 8).to(torch.uint8)
    return (octets * _bit_values(kept.device)).sum(dim=-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = packed.unsqueeze(-1).bitwise_and(_bit_values(packed.device)).ne(0)
    return bits.reshape(*packed.shape[:-1], -1)[..., :cols]


def set_sparsity_mask_(module: torch.nn.Module, kept: torch.Tensor) -> None:
    """Record ``kept`` (bool, shaped like the weight, True = weight may be non-zero)."""
    kept = kept.to(device=module.weight.device, dtype=torch.bool)
    if kept.shape != module.weight.shape:
        raise ValueError(f"mask shape {tuple(kept.shape)} differs from weight {tuple(module.weight.shape)}")
    module.register_buffer(MASK_BUFFER, _pack_bits(kept), persistent=False)


def clear_sparsity_mask_(module: torch.nn.Module) -> None:
    """Forget ``module``'s mask: a later step refilled its zeros, so the checkpoint must not
    claim them."""
    if getattr(module, MASK_BUFFER, None) is not None:
        delattr(module, MASK_BUFFER)
    if getattr(module, _SUMMARY, None) is not None:
        object.__delattr__(module, _SUMMARY)


def sparsity_mask(module: torch.nn.Module) -> torch.Tensor | None:
    """The mask a pruning modifier left on ``module``, if any (bool, shaped like the weight)."""
    packed = getattr(module, MASK_BUFFER, None)
    if packed is None:
        return None
    return _unpack_bits(packed, module.weight.shape[-1])


def apply_mask_(module: torch.nn.Module) -> None:
    """Zero the weights the mask prunes (after an update that may have refilled them)."""
    mask = sparsity_mask(module)
    if mask is not None:
        with torch.no_grad():
            module.weight.mul_(mask)
