"""A third-party-style plugin used by the tests: it records what the pipeline shows it.

It is registered through a (fake) entry point exactly like an installed package would be, so the
tests exercise the same discovery path as a real third-party plugin.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from llmc import Modifier, RunContext, hookimpl
from llmc.experts_adapters import ExpertsAdapter, ExpertsLayout, GatedActivation

EVENTS: list[tuple[str, ...]] = []
RUNS: list[RecordInputsRun] = []


@attrs.frozen(kw_only=True)
class RecordInputsModifier(Modifier):
    """Keeps the hidden states each block receives, to check error propagation."""

    label: str = "recorder"
    needs_data: bool = True

    def start(self, context: RunContext) -> RecordInputsRun:
        run = RecordInputsRun(self)
        RUNS.append(run)
        return run


@attrs.define
class RecordInputsRun:
    config: RecordInputsModifier
    inputs: dict[str, list[torch.Tensor]] = attrs.field(factory=dict)
    masks_seen: int = 0
    handle: Any = None

    @hookimpl
    def llmc_initialize(self, context: RunContext) -> None:
        EVENTS.append((self.config.label, "initialize"))

    @hookimpl
    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        EVENTS.append((self.config.label, "layer_start", layer_name))
        store = self.inputs.setdefault(layer_name, [])

        def grab(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            store.append(hidden.detach().clone())
            if context.attention_mask is not None:
                self.masks_seen += 1

        self.handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        return self.config.needs_data

    @hookimpl
    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        EVENTS.append((self.config.label, "layer_end", layer_name))
        self.handle.remove()

    @hookimpl
    def llmc_finalize(self, context: RunContext) -> None:
        EVENTS.append((self.config.label, "finalize"))


@attrs.frozen(kw_only=True)
class ShadowQuantizationModifier(Modifier):
    """Offers a name core also offers, to test how the registry resolves a clash."""

    modifier_name: ClassVar[str] = "QuantizationModifier"
    requires_calibration_data: ClassVar[bool] = False

    def start(self, context: RunContext) -> object:
        return object()


@attrs.frozen(kw_only=True)
class RecordTrainingModifier(Modifier):
    """Logs every training hook it receives, to check the order train calls them in."""

    requires_calibration_data: ClassVar[bool] = False
    supports_training: ClassVar[bool] = True
    extra_loss: float = 0.0
    fail_at_step: int = -1  # raise at the start of this step, as a killed run would stop

    def start(self, context: RunContext) -> RecordTrainingRun:
        run = RecordTrainingRun(self)
        RUNS.append(run)
        return run


@attrs.define
class RecordTrainingRun:
    config: RecordTrainingModifier
    calls: list[str] = attrs.field(factory=list)
    batch_sizes: list[int] = attrs.field(factory=list)
    optimizer: Any = None

    @hookimpl
    def llmc_initialize(self, context: RunContext) -> None:
        self.calls.append("initialize")

    @hookimpl
    def llmc_train_start(self, context: RunContext, optimizer: Any) -> None:
        self.calls.append(f"train_start:{context.total_steps}")
        self.optimizer = optimizer

    @hookimpl
    def llmc_train_batch_start(self, context: RunContext, step: int) -> None:
        self.calls.append(f"batch_start:{step}")
        if step == self.config.fail_at_step:
            raise RuntimeError(f"stopped at step {step}")

    @hookimpl
    def llmc_train_loss(self, context, step, batch, outputs, loss):
        self.calls.append(f"loss:{step}")
        self.batch_sizes.append(len(batch["input_ids"]))
        return torch.tensor(self.config.extra_loss) if self.config.extra_loss else None

    @hookimpl
    def llmc_train_after_backward(self, context: RunContext, step: int) -> None:
        grads = [p.grad for p in context.model.parameters() if p.grad is not None]
        self.calls.append(f"after_backward:{step}:{bool(grads)}")

    @hookimpl
    def llmc_train_optimizer_step_end(self, context: RunContext, step: int) -> None:
        self.calls.append(f"step_end:{step}")

    @hookimpl
    def llmc_train_end(self, context: RunContext) -> None:
        self.calls.append("train_end")

    @hookimpl
    def llmc_finalize(self, context: RunContext) -> None:
        self.calls.append("finalize")


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    return [RecordInputsModifier, ShadowQuantizationModifier, RecordTrainingModifier]


class AcmeExperts(torch.nn.Module):
    """A third party's fused experts: separate 3-D gate, up and down weights in ``x @ W`` layout,
    ``forward(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` as transformers' have."""

    def __init__(self, experts: int = 4, hidden: int = 16, width: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gate = torch.nn.Parameter(torch.randn(experts, hidden, width, generator=generator))
        self.up = torch.nn.Parameter(torch.randn(experts, hidden, width, generator=generator))
        self.down = torch.nn.Parameter(torch.randn(experts, width, hidden, generator=generator))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in range(self.gate.shape[0]):
            token, slot = torch.where(top_k_index == expert)
            x = hidden[token]
            y = (torch.nn.functional.silu(x @ self.gate[expert]) * (x @ self.up[expert])) @ self.down[expert]
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class AcmeExpertsAdapter(ExpertsAdapter):
    """Unfuses ``AcmeExperts`` into Linears named as Mixtral names them."""

    adapter_name = "acme"
    experts_classes = ("AcmeExperts",)

    @classmethod
    def layout(cls, model: torch.nn.Module, name: str, module: torch.nn.Module) -> ExpertsLayout | str:
        tensors = {"gate": module.gate.data, "up": module.up.data, "down": module.down.data}
        return ExpertsLayout(
            experts=module.gate.shape[0], names={"gate": "w1", "up": "w3", "down": "w2"},
            weight=lambda role, expert: tensors[role][expert].T, bias=None,
            act_fn=GatedActivation(torch.nn.functional.silu),
        )


@hookimpl
def llmc_register_experts_adapters() -> list[type[ExpertsAdapter]]:
    return [AcmeExpertsAdapter]
