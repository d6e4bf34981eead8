"""Global scales shared by the Linears vLLM fuses into one matrix.

vLLM serves q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``; an NVFP4 kernel has
room for one global scale per fused matrix, so the siblings must be quantized under the same
one, computed from all their weights together. llm-compressor 0.14 links its weight observers
over the same groups of names (``FUSED_LAYER_NAMES``); using its list keeps checkpoints equal.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmc.quantization.math import global_scale_from_range
from llmc.quantization.scheme import QuantizationScheme

__all__ = ["FUSED_SIBLINGS", "shared_global_scales", "take_global_scale"]

# Child names of one parent module that vLLM fuses.
FUSED_SIBLINGS = (
    ("gate_proj", "up_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("w1", "w3"),
)


def _siblings(name: str, planned: set[str]) -> tuple[str, ...]:
    parent, _, leaf = name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    for group in FUSED_SIBLINGS:
        if leaf in group:
            members = tuple(prefix + member for member in group)
            return members if all(member in planned for member in members) else (name,)
    return (name,)


@torch.no_grad()
def shared_global_scales(
    plan: dict[str, tuple[nn.Linear, QuantizationScheme]], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The NVFP4 global scale of each module in ``names`` and of its fused siblings in ``plan``.

    Call it before any of the siblings is quantized (it reads their current weights). A group
    is fused only when all its members are planned with a ``tensor_group`` scheme, as
    llm-compressor requires; a module outside any group gets its own weight's scale.
    """
    tensor_group = {n for n, (_, scheme) in plan.items() if scheme.weights.has_global_scale}
    scales: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in tensor_group or name in scales:
            continue
        members = _siblings(name, tensor_group)
        lo = torch.stack([plan[m][0].weight.detach().min() for m in members]).min()
        hi = torch.stack([plan[m][0].weight.detach().max() for m in members]).max()
        absmax = torch.maximum(-lo, hi)
        scale = global_scale_from_range(-absmax.reshape(1), absmax.reshape(1))
        scales.update(dict.fromkeys(members, scale))
    return scales


def take_global_scale(
    cache: dict[str, torch.Tensor],
    plan: dict[str, tuple[nn.Linear, QuantizationScheme]],
    name: str,
) -> torch.Tensor | None:
    """The NVFP4 global scale to quantize ``name`` under, None for schemes without one.

    Computed for ``name`` and its fused siblings together the first time one of them asks
    (call it while ``name`` is still in ``plan``: its siblings then are too, unquantized), kept
    in ``cache`` (the modifier run's) and handed out once to each.
    """
    if not plan[name][1].weights.has_global_scale:
        return None
    if name not in cache:
        cache.update(shared_global_scales(plan, [name]))
    return cache.pop(name)
