"""Quantization-aware training: a Linear computes with its fake-quantized weight while training.

While ``start_qat_`` is in effect, the module's forward is

    y = x_q · W_qᵀ + b,   W_q = W + (fake_quantize(W) − W).detach()

the straight-through estimator (Bengio, Léonard, Courville 2013, arXiv 1308.3432; as used for
QAT by Jacob et al. 2018, arXiv 1712.05877): the forward sees the weight exactly as round-to-
nearest would quantize it now (min-max scales of the current weight, the arithmetic of
``quantize_linear_``), and the gradient passes to the float weight unchanged, so the optimizer
keeps updating float weights that drift across rounding boundaries. With dynamic input
quantization (W8A8) the input is fake-quantized the same way. ``stop_qat_`` restores the plain
forward; quantizing the trained weight with ``quantize_linear_`` then gives the module the
forward it had at the last training step, and the checkpoint holds that.

The module keeps its parameters and state-dict keys (the forward is replaced on the instance),
so optimizers built before, and Trainer checkpoints written or loaded during, QAT are unaffected.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from llmc.quantization.math import (
    compute_qparams,
    dynamic_activation_fake_quantize,
    effective_scale,
    fake_quantize,
    global_scale_from_range,
)
from llmc.quantization.scheme import QuantizationScheme

__all__ = ["fake_quantized_weight", "in_qat", "start_qat_", "stop_qat_"]

_SCHEME = "_llmc_qat_scheme"


@torch.no_grad()
def fake_quantized_weight(weight: torch.Tensor, scheme: QuantizationScheme) -> torch.Tensor:
    """``W`` rounded onto its own min-max grid, exactly as ``quantize_linear_`` would round it
    (NVFP4 under the weight's own global scale; fused siblings share one only at the end)."""
    args = scheme.weights
    global_scale = global_scale_from_range(*torch.aminmax(weight)) if args.has_global_scale else None
    scale, zero_point = compute_qparams(weight, args, global_scale)
    # quantize_linear_ keeps the scale in the weight's dtype (as the checkpoint does)
    return fake_quantize(weight, effective_scale(scale.to(weight.dtype), global_scale), zero_point, args)


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity in the backward pass."""
    return x + (quantized - x).detach()


def _qat_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scheme: QuantizationScheme = getattr(self, _SCHEME)
    weight = self.weight
    if scheme.weights is not None:
        weight = _straight_through(weight, fake_quantized_weight(weight.detach(), scheme))
    if scheme.input_activations is not None:
        x = _straight_through(x, dynamic_activation_fake_quantize(x.detach(), scheme.input_activations))
    return F.linear(x, weight, self.bias)


def start_qat_(module: nn.Linear, scheme: QuantizationScheme) -> None:
    """Make ``module`` compute with its fake-quantized weight (straight-through gradients)."""
    setattr(module, _SCHEME, scheme)
    module.forward = types.MethodType(_qat_forward, module)


def stop_qat_(module: nn.Linear) -> None:
    """Give ``module`` its plain forward back (its weight is left as trained)."""
    if in_qat(module):
        del module.forward
        delattr(module, _SCHEME)


def in_qat(module: nn.Module) -> bool:
    """Whether ``start_qat_`` is in effect on ``module``."""
    return hasattr(module, _SCHEME)
