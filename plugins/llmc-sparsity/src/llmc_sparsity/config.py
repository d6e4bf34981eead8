"""The sparsity record a checkpoint's ``quantization_config.sparsity_config`` should carry.

compressed-tensors (0.20) defines the fields (``SparsityCompressionConfig``, format ``dense``:
the weights are stored as they are, zeros included)::

    {"format": "dense", "global_sparsity": 0.37, "sparsity_structure": "2:4",
     "targets": null, "ignore": ["lm_head", ...]}

* ``global_sparsity``: pruned weights / all parameters of the model (compressed-tensors: "the
  average sparsity of the entire model"); the per-module figures are in the run report.
* ``sparsity_structure``: ``"N:M"`` when every pruned module keeps exactly N of every M input
  columns, else ``"unstructured"`` (read from the masks, not from a recipe).
* ``targets: null`` (compressed-tensors: all layers) with every unpruned Linear in ``ignore``.
  Not ``["Linear"]``: vLLM maps the targets to its sparse kernels and then requires their GPU
  (a 2:4 W8A8 checkpoint would refuse to load below compute capability 9.0). With ``null``
  vLLM loads the checkpoint exactly as it loads one whose ``sparsity_config`` is ``{}``.

transformers ignores the field (compressed-tensors' ``QuantizationConfig`` drops extra keys),
so the checkpoint loads and computes as before. Core writes it through the plugin's
``llmc_checkpoint_config`` hook (``llmc_sparsity.plugin``).
"""

from __future__ import annotations

from typing import Any

import torch

from llmc.masks import mask_structure, mask_summary

__all__ = ["checkpoint_sparsity_config", "mask_structure_of"]

# The structure test lives in core (a streamed run needs it before releasing a layer).
mask_structure_of = mask_structure


def _linear_like(module: torch.nn.Module) -> bool:
    return any(cls.__name__ == "Linear" for cls in type(module).__mro__)


@torch.no_grad()
def checkpoint_sparsity_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The ``sparsity_config`` dict for ``model`` (see module docstring), or None if unpruned."""
    pruned = 0
    structures: set[tuple[int, int] | None] = set()
    unpruned_linears: list[str] = []
    any_mask = False
    for name, module in model.named_modules():
        summary = mask_summary(module)
        if summary is None:
            if _linear_like(module):
                unpruned_linears.append(name)
            continue
        any_mask = True
        pruned += summary.pruned
        structures.add(summary.structure)
    if not any_mask:
        return None
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():  # tied parameters once
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    structure = "unstructured"
    if len(structures) == 1 and None not in structures:
        keep_n, group_m = next(iter(structures))
        structure = f"{keep_n}:{group_m}"
    return {
        "format": "dense",
        "global_sparsity": round(pruned / max(total, 1), 6),
        "sparsity_structure": structure,
        "targets": None,
        "ignore": sorted(unpruned_linears),
    }
