"""Hessians of Linears that read the same input, accumulated once.

In a decoder layer q/k/v_proj all read the normed hidden states and gate/up_proj the same MLP
input, so their Hessians H = 2/N Σ x xᵀ are equal; computing each separately triples (or
doubles) the cost of the most expensive matrix products of the calibration pass. A module whose
first input is the very tensor object another module received in the same batch shares that
module's ``llmc.hessian.HessianAccumulator`` (and later its Cholesky factor); the sharing is
decided on the first batch and checked on every later one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.hessian import HessianAccumulator

__all__ = ["attach_shared_hessian_hooks"]


def attach_shared_hessian_hooks(
    modules: Mapping[str, torch.nn.Linear], context: RunContext
) -> tuple[dict[str, HessianAccumulator], Callable[[], None]]:
    """Like ``llmc.hessian.attach_hessian_hooks``, but modules fed the same tensor share H.

    Returns ``{module name: accumulator}`` (shared accumulators appear under several names)
    and a function that removes the hooks. Raises ``CalibrationError`` if modules that shared
    an input on the first batch stop sharing it.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    leader_of: dict[str, str] = {}  # module → the module whose accumulator it uses
    last_input: dict[str, torch.Tensor] = {}  # leader → the tensor it accumulated last
    handles = []

    for name, module in modules.items():

        def hook(_: torch.nn.Module, args: tuple, name: str = name, module: torch.nn.Linear = module) -> None:
            x = args[0]
            leader = leader_of.get(name)
            if leader is None:  # first batch: does a module already hold this very tensor?
                leader = next((other for other, seen in last_input.items() if seen is x), name)
                leader_of[name] = leader
                if leader == name:
                    accumulators[name] = HessianAccumulator.for_linear(module)
                else:
                    accumulators[name] = accumulators[leader]
            if leader != name:
                if last_input.get(leader) is not x:
                    raise CalibrationError(
                        f"{name} shared its input with {leader} on the first calibration batch "
                        "but not on a later one; their Hessians cannot be shared",
                        module=name,
                    )
                return
            accumulators[name].add_(x.detach(), context.attention_mask)
            last_input[name] = x  # a reference: the tensor cannot be freed and its id reused

        handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        last_input.clear()

    return accumulators, remove
