"""What GPTQ gathers during calibration, besides the Hessian: the output energy of wide Linears.

GPTQ reports each module's relative output error ‖(W − Ŵ)X‖² / ‖WX‖²; its reference ‖WX‖² =
trace(W H Wᵀ) is read from H at solve time for narrow inputs, and summed from the Linear's
outputs during calibration for wide ones, where the product at solve time would cost more.
"""

from __future__ import annotations

import attrs
import torch

from llmc.statistics import real_tokens

__all__ = ["ENERGY_FROM_OUTPUTS_MIN_COLS", "OutputEnergy", "output_energy_for"]

# Below this input width ``trace(W H Wᵀ)`` costs less as a product at solve time (rows · cols²)
# than as a pass over the Linear's outputs during calibration (tokens · rows).
ENERGY_FROM_OUTPUTS_MIN_COLS = 1024


@attrs.define
class OutputEnergy:
    """Running 2/N Σ ‖W x‖² over the calibration tokens (an ``llmc.statistics.Statistic`` of a
    Linear's outputs; its bias is taken off first)."""

    total: torch.Tensor
    bias: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        y = x.detach()
        if self.bias is not None:
            y = y - self.bias
        y = real_tokens(y, mask)  # [tokens, out]
        # one fused reduction, no float64 copy of the output
        self.total += torch.linalg.vector_norm(y, dtype=torch.float32).double().square()
        self.tokens += y.shape[0]

    def merge(self, other: OutputEnergy) -> None:
        self.total += other.total.to(self.total.device)
        self.tokens += other.tokens

    def shard_sums(self) -> list[torch.Tensor]:
        return [self.total]

    def finalize(self) -> float | None:
        return 2.0 * self.total.item() / self.tokens if self.tokens else None

    @property
    def value(self) -> float | None:
        return self.finalize()


def output_energy_for(module: torch.nn.Linear) -> OutputEnergy | None:
    """The output statistic GPTQ asks the calibration layer for: only for wide inputs."""
    if module.in_features < ENERGY_FROM_OUTPUTS_MIN_COLS:
        return None
    return OutputEnergy(torch.zeros((), dtype=torch.float64, device=module.weight.device), module.bias)
