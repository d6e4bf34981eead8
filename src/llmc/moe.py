"""Mixture-of-experts layers as Linears: unfuse the fused experts of transformers 5.

transformers 5 keeps the experts of MoE models in one module with 3-D parameters indexed by
expert (Qwen3-MoE's ``gate_up_proj: [E, 2I, H]``, ``down_proj: [E, H, I]``), not as
``nn.Linear``. A recipe targeting ``Linear`` would leave them in full precision, and the
checkpoints vLLM reads name each expert (``mlp.experts.3.gate_proj.weight``).
``unfuse_experts_`` therefore replaces every such module, after loading and before a recipe
runs, by an ``UnfusedExperts``::

    mlp.experts  (Qwen3MoeExperts: gate_up_proj [E, 2I, H], down_proj [E, H, I])
        ->  mlp.experts  (UnfusedExperts, an nn.ModuleList)
              0: ExpertMLP(gate_proj Linear[H→I], up_proj Linear[H→I], down_proj Linear[I→H])
              ...
              E-1: ...

**Which modules, and how they are cut.** A module is a fused experts module when it holds 3-D
parameters indexed by expert (``down_proj``), carries the attributes transformers'
``@use_experts_implementation`` sets (``has_gate``, ``has_bias``, ``is_transposed``), or is of
a class an experts adapter names. How to cut it is the adapter's part
(``llmc.experts_adapters``, registered through the plugin API): where each expert's gate, up
and down weights and biases lie, what joins gate and up, how tokens reach the experts and what
the checkpoints call each Linear. Core's adapters cover transformers' own convention by
structure (Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V3 and others, named as transformers' loader
merges from, Mixtral's ``w1``/``w3``/``w2``), GPT-OSS (interleaved gate and up, biases, a
clamped SwiGLU) and Llama 4 (tokens stacked per expert and pre-scaled by their routing scores).
A module no adapter can cut is refused with one line naming it, since leaving it fused would
silently skip the experts. Where the fused layout allows (transformers' convention) the
per-expert weights are views of the fused tensors and nothing is copied; transposed or
interleaved layouts (GPT-OSS, Llama 4) are copied once into contiguous ``[out, in]`` matrices.
``UnfusedExperts.forward`` has the fused module's signature and computes what its eager forward
computes (the same values up to the rounding of a product computed in another order).

**Checkpoints.** The state dict carries the per-expert names, and ``save`` applies only the
model's own renamings (Mixtral's ``mlp`` → ``block_sparse_moe``). Where transformers' loader
expects the experts fused (GPT-OSS always, Llama 4 unless quantized), ``llmc.models.load_model``
reads the per-expert checkpoint by building the model with its experts unfused
(``llmc.moe_checkpoints``).

**Routers.** The ``nn.Linear`` children of a block holding experts (Qwen2-MoE's
``shared_expert_gate``, Llama 4's ``Llama4Router``) are marked as routers: class-name targets
(``Linear``) pass them over (``llmc.targets.is_router``), so no default recipe compresses them.
The routers of the other architectures are their own modules, not Linears. Shared experts are
ordinary Linears.

**Calibration.** During the pipeline's calibration passes (``experts_calibration``; never in
its propagation passes or after the run) every expert runs on each batch even when no token is
routed to it, so its modules take part in the grouping of ``llmc.statistics`` from the first
batch on, and a statistic with no tokens is each modifier's "never reached" case (GPTQ rounds
to nearest, pruning leaves the module dense, both with a warning). With ``all_experts``
(``moe_calibrate_all_experts``, on by default) every expert computes on every token of the
batch, so each expert is calibrated on all real tokens (its inputs are the batch's tokens in
order, so the padding mask applies; the gate/up projections of all experts read one tensor and
share one statistic); the module's output still takes only each token's routed experts (the
same values, up to the rounding of a product over more rows). Routed calibration gives each
expert the tokens routed to it, padding included (``llmc.statistics.real_tokens``). The real
tokens routed to each expert are counted per pass, and the pipeline adds them to the report rows
of the expert's modules (``routed_tokens``). Llama 4's experts (the ``stacked`` routing) are
always calibrated on their routed tokens: a token not routed to an expert reaches it as a zero
row, which would add tokens and no information to its statistics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from llmc.distributed import sum_counts
from llmc.errors import ModelLoadError
from llmc.experts_adapters import ROLES, ExpertsAdapter, ExpertsLayout
from llmc.targets import mark_router_

__all__ = [
    "ExpertMLP",
    "UnfusedExperts",
    "experts_calibration",
    "find_fused_experts",
    "record_routed_tokens",
    "resolve_adapters",
    "unfuse_experts_",
    "unfusing_layouts",
]

logger = logging.getLogger("llmc.moe")

# Set on an experts module's instance by transformers' @use_experts_implementation.
_CONVENTION = ("has_gate", "has_bias", "is_transposed")


class ExpertMLP(nn.Module):
    """One expert: ``down(act_fn(gate(x), up(x)))``, its Linears named as the checkpoint names them.

    ``names`` maps each role (``gate``, ``up``, ``down``) to the Linear's name (``gate_proj``
    or Mixtral's ``w1``); ``projection(role)`` returns the Linear. ``act_fn`` joins the gate and
    up projections (``llmc.experts_adapters.GatedActivation`` for ``act(gate) * up``).
    """

    def __init__(self, names: dict[str, str], linears: dict[str, nn.Linear], act_fn: nn.Module) -> None:
        super().__init__()
        self.names = dict(names)
        for role in ROLES:
            self.add_module(names[role], linears[role])
        self.act_fn = act_fn

    def projection(self, role: str) -> nn.Linear:
        return self._modules[self.names[role]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._modules[self.names["gate"]](x)
        up = self._modules[self.names["up"]](x)
        return self._modules[self.names["down"]](self.act_fn(gate, up))


@attrs.define
class _Calibration:
    """Set on an ``UnfusedExperts`` while a calibration pass runs through its block."""

    all_experts: bool
    attention_mask: Callable[[], torch.Tensor | None]
    fresh: bool = True  # the routed-token counts restart at this pass's first forward


class UnfusedExperts(nn.ModuleList):
    """The experts of an MoE block as a list of ``ExpertMLP`` (see the module docstring).

    Its forward is the fused module's, by ``routing`` (``llmc.experts_adapters.ROUTINGS``):
    ``routed``, ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) ->
    [T, H]``, sums over each token's K routed experts the expert's output times the routing
    weight; ``stacked`` (Llama 4), ``forward(stacked [E * T, H]) -> [E * T, H]``, gives each
    expert its T rows (the tokens, already scaled by their routing scores, zero where not
    routed). ``routed_tokens`` (``[E]``, or None before any calibration pass) counts the real
    tokens routed to each expert in the last calibration pass that reached the module.
    """

    def __init__(self, experts: list[ExpertMLP], fused_class: str = "", routing: str = "routed") -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.fused_class = fused_class
        self.routing = routing
        self.calibration: _Calibration | None = None
        self.routed_tokens: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"unfused from {self.fused_class}" if self.fused_class else ""

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.routing == "stacked":
            return self._stacked(hidden_states)
        calibration = self.calibration
        final = torch.zeros_like(hidden_states)  # [T, H]
        with torch.no_grad():
            # per expert: the tokens routed to it, ascending, and the top-k slot that chose it
            routed = [torch.where(top_k_index == index) for index in range(self.num_experts)]
        if calibration is not None:
            self._count_routed(top_k_index, calibration)
        for index, expert in enumerate(self):
            token_index, slot = routed[index]
            if calibration is not None and calibration.all_experts:
                output = expert(hidden_states)[token_index]  # every token, routed rows kept
            elif calibration is not None or token_index.numel():
                output = expert(hidden_states[token_index])
            else:
                continue
            weighted = output * top_k_weights[token_index, slot, None]
            final.index_add_(0, token_index, weighted.to(final.dtype))
        return final

    def _stacked(self, stacked: torch.Tensor) -> torch.Tensor:
        """Each expert on its routed rows: an unrouted row is zero, and so is its output (the
        experts of this routing have no biases), so skipping it changes nothing. Calibration is
        routed whatever ``all_experts`` says: an unrouted token reaches an expert as a zero row,
        which would add tokens and no information to its statistics."""
        per_expert = stacked.reshape(self.num_experts, -1, stacked.shape[-1])  # [E, T, H]
        with torch.no_grad():
            chosen = per_expert.ne(0).any(dim=-1)  # [E, T]: the token was routed to the expert
        if self.calibration is not None:
            real = self._real_tokens(self.calibration, chosen.shape[1], chosen.device)
            counted = chosen if real is None else chosen & real
            self._add_counts(counted.sum(dim=1), self.calibration)
        output = torch.zeros_like(per_expert)
        for index, expert in enumerate(self):
            rows = torch.where(chosen[index])[0]
            if rows.numel() or self.calibration is not None:
                output[index, rows] = expert(per_expert[index, rows]).to(output.dtype)
        return output.reshape(stacked.shape)

    @torch.no_grad()
    def _real_tokens(self, calibration: _Calibration, tokens: int, device: torch.device) -> torch.Tensor | None:
        """Which of the pass's ``tokens`` tokens are real (not padding), or None when all are."""
        mask = calibration.attention_mask()
        if mask is None or mask.numel() != tokens:
            return None
        return mask.reshape(-1).to(device=device, dtype=torch.bool)

    @torch.no_grad()
    def _count_routed(self, top_k_index: torch.Tensor, calibration: _Calibration) -> None:
        """Add the real tokens routed to each expert; ``top_k_index [T, K]`` is each token's experts."""
        real = self._real_tokens(calibration, top_k_index.shape[0], top_k_index.device)
        if real is not None:
            top_k_index = top_k_index[real]
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[: self.num_experts]
        self._add_counts(counts, calibration)

    def _add_counts(self, counts: torch.Tensor, calibration: _Calibration) -> None:
        if calibration.fresh or self.routed_tokens is None:
            calibration.fresh = False
            self.routed_tokens = counts
        else:
            self.routed_tokens = self.routed_tokens + counts


def _is_fused_experts(module: nn.Module, classes: frozenset[str] = frozenset()) -> bool:
    if isinstance(module, UnfusedExperts):
        return False
    if type(module).__name__ in classes or all(hasattr(module, attribute) for attribute in _CONVENTION):
        return True
    down = module._parameters.get("down_proj")
    return isinstance(down, torch.Tensor) and down.dim() == 3


def resolve_adapters(adapters: Sequence[type[ExpertsAdapter]] | None) -> Sequence[type[ExpertsAdapter]]:
    """``adapters``, or when None those the installed plugins register (``llmc.plugins``)."""
    if adapters is not None:
        return adapters
    from llmc.plugins import load_registry

    return load_registry().experts_adapter_classes()


def find_fused_experts(
    model: nn.Module, adapters: Sequence[type[ExpertsAdapter]] = ()
) -> list[tuple[str, nn.Module]]:
    """Every fused experts module of ``model`` (see the module docstring), with its name;
    a module whose class one of ``adapters`` names counts whatever its structure."""
    classes = frozenset(name for adapter in adapters for name in adapter.experts_classes)
    return [(name, module) for name, module in model.named_modules() if name and _is_fused_experts(module, classes)]


def _layout(
    model: nn.Module, name: str, module: nn.Module, adapters: Sequence[type[ExpertsAdapter]]
) -> tuple[type[ExpertsAdapter], ExpertsLayout] | str:
    """The first adapter's layout for ``module``: those naming its class, then the structural
    ones; when none succeeds, the reason the first one tried gave."""
    named = [adapter for adapter in adapters if type(module).__name__ in adapter.experts_classes]
    candidates = named or [adapter for adapter in adapters if not adapter.experts_classes]
    reasons = []
    for adapter in candidates:
        layout = adapter.layout(model, name, module)
        if isinstance(layout, ExpertsLayout):
            return adapter, layout
        reasons.append(layout)
    return reasons[0] if reasons else "no experts adapter handles it"


def unfusing_layouts(
    model: nn.Module, adapters: Sequence[type[ExpertsAdapter]] | None = None, modules: Collection[str] | None = None
) -> list[tuple[str, nn.Module, ExpertsLayout]]:
    """Every fused experts module of ``model`` (of those named in ``modules``, when given) with
    the layout to unfuse it by.

    ``adapters`` defaults to those the installed plugins register. One that no adapter can
    unfuse raises ``ModelLoadError`` naming it and why.
    """
    adapters = resolve_adapters(adapters)
    plans = []
    for name, module in find_fused_experts(model, adapters):
        if modules is not None and name not in modules:
            continue
        found = _layout(model, name, module, adapters)
        if isinstance(found, str):
            raise ModelLoadError(
                f"{name} ({type(module).__name__}) holds its experts as fused 3-D weights that llmc "
                f"cannot unfuse into Linears: {found}; llmc unfuses the experts of Qwen2-MoE, "
                "Qwen3-MoE, Mixtral, DeepSeek-V3, GPT-OSS, Llama 4 and other models whose checkpoints "
                "name each expert, and a plugin can add an experts adapter (llmc_register_experts_adapters)"
            )
        plans.append((name, module, found[1]))
    return plans


@torch.no_grad()
def _unfused(module: nn.Module, layout: ExpertsLayout) -> UnfusedExperts:
    requires_grad = next(module.parameters()).requires_grad
    experts = []
    for index in range(layout.experts):
        linears = {}
        for role in ROLES:
            # [out, in]; a view of the fused tensor unless its layout is transposed or interleaved
            weight = layout.weight(role, index).contiguous()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layout.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
            if layout.bias is not None:
                linear.bias = nn.Parameter(layout.bias(role, index).contiguous(), requires_grad=requires_grad)
            linears[role] = linear
        experts.append(ExpertMLP(dict(layout.names), linears, layout.act_fn))
    unfused = UnfusedExperts(experts, fused_class=type(module).__name__, routing=layout.routing)
    unfused.train(module.training)
    return unfused


def unfuse_experts_(
    model: nn.Module, adapters: Sequence[type[ExpertsAdapter]] | None = None, *, modules: Collection[str] | None = None
) -> list[str]:
    """Replace every fused experts module of ``model`` (or those named in ``modules``) by an
    ``UnfusedExperts``, in place.

    Returns the names of the replaced modules (none for a dense model). Every module is checked
    before any is replaced (``unfusing_layouts``): one that cannot be unfused raises
    ``ModelLoadError`` and leaves the model as it was. The ``nn.Linear`` children of each
    experts module's parent are marked as routers (``llmc.targets.mark_router_``).
    """
    plans = unfusing_layouts(model, adapters, modules)
    for name, module, layout in plans:
        model.set_submodule(name, _unfused(module, layout))
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        for child in parent.children():
            if isinstance(child, nn.Linear):
                mark_router_(child)
    if plans:
        name, module, layout = plans[0]
        logger.info(
            "unfused %d experts modules (%s, %d experts each) into per-expert Linears %s",
            len(plans), type(module).__name__, layout.experts, "/".join(layout.names[role] for role in ROLES),
        )
    return [name for name, _, _ in plans]


@contextlib.contextmanager
def experts_calibration(
    block: nn.Module, *, all_experts: bool, attention_mask: Callable[[], torch.Tensor | None]
) -> Iterator[None]:
    """Run the ``UnfusedExperts`` in ``block`` in calibration mode while the context is held.

    Every expert runs on each batch, on all tokens when ``all_experts`` (see the module
    docstring); ``attention_mask()`` gives the current batch's mask, so routed-token counts
    leave padding out.
    """
    modules = [module for module in block.modules() if isinstance(module, UnfusedExperts)]
    for module in modules:
        module.calibration = _Calibration(all_experts, attention_mask)
    try:
        yield
    finally:
        for module in modules:
            module.calibration = None


def record_routed_tokens(rows: list[dict[str, Any]], block_name: str, block: nn.Module) -> None:
    """Add ``routed_tokens`` to the report rows of the expert modules of ``block``."""
    counts: dict[str, list[int]] = {}
    for local, module in block.named_modules():
        if isinstance(module, UnfusedExperts) and module.routed_tokens is not None:
            total = sum_counts(module.routed_tokens, f"counting the tokens routed in {block_name}")
            counts[f"{block_name}.{local}."] = total.tolist()
            module.routed_tokens = None
    if not counts:
        return
    for row in rows:
        name = row.get("module", "")
        for prefix, per_expert in counts.items():
            if name.startswith(prefix):
                expert = name[len(prefix):].partition(".")[0]
                if expert.isdigit() and int(expert) < len(per_expert):
                    row["routed_tokens"] = per_expert[int(expert)]
