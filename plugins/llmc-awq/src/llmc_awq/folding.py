"""Folding per-channel scales into a model so that it computes the same function.

``y = W x`` becomes ``(W diag(s)) (x / s)``: the *balance* modules (the Linears, and routers,
that read ``x``) get their weight columns multiplied by ``s``, and the *smooth* module that
produced ``x`` gets its output channels divided by ``s``:

* a normalisation whose output is ``n(x) ⊙ (w + c)`` (``c = 0`` for RMSNorm and LayerNorm,
  ``c = 1`` for Gemma's ``1 + w``; a bias, if any, is divided too): ``w ← (w + c) / s − c``;
* a Linear whose output rows ``[offset, offset + len(s))`` feed ``x`` (all of them, or the
  ``v`` rows of a fused ``qkv_proj``, the ``up`` rows of a fused ``gate_up_proj``): those rows,
  and their bias, are divided by ``s``.

Every change is computed in float32 and stored in the parameter's dtype, in place (the
parameter objects stay the same, so optimisers, offloading and tied views are unaffected).
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["Producer", "balance_", "fold_into_producer_"]


@attrs.frozen
class Producer:
    """How scales fold into the module that produced a group's input.

    ``kind`` is ``"norm"`` (``weight_offset`` is the ``c`` of ``n(x) ⊙ (w + c)``) or
    ``"linear"`` (``offset`` is the first output row that feeds the group).
    """

    kind: str
    offset: int = 0
    weight_offset: float = 0.0


def _set_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.data.copy_(value.to(parameter.dtype))


@torch.no_grad()
def fold_into_producer_(module: torch.nn.Module, producer: Producer, scales: torch.Tensor) -> None:
    """Divide the output channels of ``module`` that feed the group by ``scales`` (``[cols]``)."""
    s = scales.to(device=module.weight.device, dtype=torch.float32)
    bias = getattr(module, "bias", None)
    if producer.kind == "norm":
        c = producer.weight_offset
        _set_(module.weight, (module.weight.float() + c) / s - c)
        if isinstance(bias, torch.Tensor):
            _set_(bias, bias.float() / s)
        return
    rows = slice(producer.offset, producer.offset + s.numel())
    weight = module.weight.data
    weight[rows] = (weight[rows].float() / s[:, None]).to(weight.dtype)  # [cols, in] rows of W
    if isinstance(bias, torch.Tensor):
        bias.data[rows] = (bias.data[rows].float() / s).to(bias.dtype)


@torch.no_grad()
def balance_(module: torch.nn.Module, scales: torch.Tensor) -> None:
    """Multiply the input columns of ``module``'s weight (``[rows, cols]``) by ``scales``."""
    s = scales.to(device=module.weight.device, dtype=torch.float32)
    _set_(module.weight, module.weight.float() * s[None, :])
