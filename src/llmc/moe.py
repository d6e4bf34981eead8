"""Mixture-of-experts layers as Linears: unfuse the fused experts of transformers 5.

transformers 5 keeps the experts of Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V3 and others in
one module with 3-D parameters indexed by expert (``gate_up_proj: [E, 2I, H]``,
``down_proj: [E, H, I]``), not as ``nn.Linear``. A recipe targeting ``Linear`` would leave them
in full precision, and the checkpoints vLLM and transformers read name each expert
(``mlp.experts.3.gate_proj.weight``). ``unfuse_experts_`` therefore replaces every such module,
after loading and before a recipe runs, by an ``UnfusedExperts``::

    mlp.experts  (Qwen3MoeExperts: gate_up_proj [E, 2I, H], down_proj [E, H, I])
        ->  mlp.experts  (UnfusedExperts, an nn.ModuleList)
              0: ExpertMLP(gate_proj Linear[H→I], up_proj Linear[H→I], down_proj Linear[I→H])
              ...
              E-1: ...

The per-expert Linears are named as the model's checkpoints name them (Mixtral's ``w1``, ``w3``,
``w2``), so the state dict carries exactly the per-expert names transformers' loader merges
from (``save`` then only applies the model's own renamings, e.g. Mixtral's ``mlp`` →
``block_sparse_moe``). Their weights are views of the fused tensors: nothing is copied.
``UnfusedExperts.forward`` has the fused module's signature and computes exactly what its eager
forward computes.

**Which modules.** A module is a fused experts module when it holds 3-D parameters indexed by
expert (``down_proj`` and ``gate_up_proj``/``up_proj``) or carries the attributes transformers'
``@use_experts_implementation`` sets (``has_gate``, ``has_bias``, ``is_transposed``): its
structure decides, never a table of model classes. It is unfused when its forward can be
reproduced from those attributes (gated, gate and up rows concatenated, not transposed, the
default gate ``act_fn(gate) * up``, no post-expert norm; biases allowed) and when the model's
own weight conversions (``transformers.core_model_loading``) turn its parameters into one 2-D
tensor per expert and projection, the checkpoint layout. Anything else (GPT-OSS, whose
checkpoints keep the experts fused and whose gate and up rows interleave) is refused with one
line naming the module, since leaving it fused would silently skip the experts.

**Routers.** The ``nn.Linear`` children of a block holding experts (Qwen2-MoE's
``shared_expert_gate``; the routers of these architectures are their own modules, not Linears)
are marked as routers: class-name targets (``Linear``) pass them over
(``llmc.targets.is_router``), so no default recipe compresses them. Shared experts are ordinary
Linears.

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
of the expert's modules (``routed_tokens``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from llmc.distributed import sum_counts
from llmc.errors import ModelLoadError
from llmc.targets import mark_router_

__all__ = [
    "ExpertMLP",
    "UnfusedExperts",
    "experts_calibration",
    "find_fused_experts",
    "record_routed_tokens",
    "unfuse_experts_",
]

logger = logging.getLogger("llmc.moe")

# Set on an experts module's instance by transformers' @use_experts_implementation.
_CONVENTION = ("has_gate", "has_bias", "is_transposed")
_ROLES = ("gate", "up", "down")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<local>[A-Za-z_]\w*)\.(?P<kind>weight|bias)$")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its Linears named as the checkpoint names them.

    ``names`` maps each role (``gate``, ``up``, ``down``) to the Linear's name (``gate_proj``
    or Mixtral's ``w1``); ``projection(role)`` returns the Linear.
    """

    def __init__(self, names: dict[str, str], linears: dict[str, nn.Linear], act_fn: nn.Module) -> None:
        super().__init__()
        self.names = dict(names)
        for role in _ROLES:
            self.add_module(names[role], linears[role])
        self.act_fn = act_fn

    def projection(self, role: str) -> nn.Linear:
        return self._modules[self.names[role]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._modules[self.names["gate"]](x)
        up = self._modules[self.names["up"]](x)
        return self._modules[self.names["down"]](self.act_fn(gate) * up)


@attrs.define
class _Calibration:
    """Set on an ``UnfusedExperts`` while a calibration pass runs through its block."""

    all_experts: bool
    attention_mask: Callable[[], torch.Tensor | None]
    fresh: bool = True  # the routed-token counts restart at this pass's first forward


class UnfusedExperts(nn.ModuleList):
    """The experts of an MoE block as a list of ``ExpertMLP`` (see the module docstring).

    ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`` is the
    fused experts module's: each token's output is the sum over its K routed experts of the
    expert's output times the routing weight. ``routed_tokens`` (``[E]``, or None before any
    calibration pass) counts the real tokens routed to each expert in the last calibration pass
    that reached the module.
    """

    def __init__(self, experts: list[ExpertMLP], fused_class: str = "") -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.fused_class = fused_class
        self.calibration: _Calibration | None = None
        self.routed_tokens: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"unfused from {self.fused_class}" if self.fused_class else ""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
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

    @torch.no_grad()
    def _count_routed(self, top_k_index: torch.Tensor, calibration: _Calibration) -> None:
        mask = calibration.attention_mask()
        if mask is not None and mask.numel() == top_k_index.shape[0]:
            top_k_index = top_k_index[mask.reshape(-1).to(device=top_k_index.device, dtype=torch.bool)]
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[: self.num_experts]
        if calibration.fresh or self.routed_tokens is None:
            calibration.fresh = False
            self.routed_tokens = counts
        else:
            self.routed_tokens = self.routed_tokens + counts


def _is_fused_experts(module: nn.Module) -> bool:
    if isinstance(module, UnfusedExperts):
        return False
    if all(hasattr(module, attribute) for attribute in _CONVENTION):
        return True
    down = module._parameters.get("down_proj")
    return isinstance(down, torch.Tensor) and down.dim() == 3


def find_fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fused experts module of ``model`` (see the module docstring), with its name."""
    return [(name, module) for name, module in model.named_modules() if name and _is_fused_experts(module)]


def _forward_problem(module: nn.Module) -> str | None:
    """Why the fused forward cannot be reproduced by ``ExpertMLP``s, or None when it can."""
    if not all(hasattr(module, attribute) for attribute in _CONVENTION):
        return "it does not follow transformers' experts convention (@use_experts_implementation)"
    if not module.has_gate:
        return "its experts have no gate projection"
    if module.is_transposed or not getattr(module, "is_concatenated", True):
        return "its weights are stored transposed or with gate and up rows interleaved"
    if getattr(module, "has_post_expert_norm", False):
        return "its experts apply a norm after the down projection"
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"its gate is computed by {type(module).__name__}._apply_gate, not act_fn(gate) * up"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return "it has no 3-D gate_up_proj and down_proj"
    experts, double_width, hidden = gate_up.shape
    if double_width % 2 or tuple(down.shape) != (experts, hidden, double_width // 2):
        return (
            f"its weights have shapes gate_up_proj {list(gate_up.shape)} and down_proj "
            f"{list(down.shape)}, not [E, 2I, H] and [E, H, I]"
        )
    if module.has_bias:
        for name, shape in (("gate_up_proj_bias", (experts, double_width)), ("down_proj_bias", (experts, hidden))):
            bias = module._parameters.get(name)
            if bias is None or tuple(bias.shape) != shape:
                return f"it has no {name} of shape {list(shape)}"
    return None


def _fused_slices(module: nn.Module, kind: str) -> dict[str, Callable[[int], torch.Tensor]]:
    """Each role's tensor of one expert (``kind`` weight or bias), a view of the fused parameter."""
    suffix = "" if kind == "weight" else "_bias"
    gate_up = module._parameters[f"gate_up_proj{suffix}"].data  # [E, 2I, H] or [E, 2I]
    down = module._parameters[f"down_proj{suffix}"].data  # [E, H, I] or [E, H]
    width = gate_up.shape[1] // 2
    return {
        "gate": lambda e: gate_up[e, :width],
        "up": lambda e: gate_up[e, width:],
        "down": lambda e: down[e],
    }


def _checkpoint_tensors(model: nn.Module, name: str, module: nn.Module) -> dict[str, torch.Tensor] | str:
    """The module's tensors as the model's checkpoints store them, or why they are not per expert.

    transformers' own save-time conversion (``revert_weight_conversion``, the inverse of what
    its loader does) gives them, so the names agree with the loader by construction.
    """
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(model, PreTrainedModel):
        return "the model is not a transformers PreTrainedModel, so the checkpoint names of its experts are unknown"
    fused = {f"{name}.{local}": parameter.detach() for local, parameter in module.named_parameters(recurse=False)}
    try:
        with torch.no_grad():
            reverted = dict(revert_weight_conversion(model, dict(fused)))
    except Exception as error:  # a conversion transformers cannot reverse (quantized, sharded)
        return f"transformers cannot convert its weights to the checkpoint layout ({error})"
    for key in reverted:
        if _EXPERT_KEY.match(key) is None:
            return (
                f"transformers reads this model's checkpoints with the experts fused ({key.rpartition('.')[2]}), "
                "so per-expert tensors would not load"
            )
    return reverted


def _role_names(module: nn.Module, reverted: dict[str, torch.Tensor]) -> dict[str, str] | str:
    """Each role's per-expert Linear name, by matching each checkpoint tensor to the fused slice
    it equals (a layout other than the plain split of ``[E, 2I, H]`` matches nothing)."""
    experts = module._parameters["gate_up_proj"].shape[0]
    kinds = ("weight", "bias") if module.has_bias else ("weight",)
    slices = {kind: _fused_slices(module, kind) for kind in kinds}
    equals: dict[tuple[str, str], set[str]] = {}  # (kind, local name) -> roles equal for every expert
    covered: dict[tuple[str, str], set[int]] = {}
    for key, tensor in reverted.items():
        match = _EXPERT_KEY.match(key)
        kind, local, expert = match["kind"], match["local"], int(match["expert"])
        if kind not in slices or expert >= experts:
            return "its checkpoint tensors are not one per expert and projection"
        roles = {
            role for role, piece in slices[kind].items()
            if piece(expert).shape == tensor.shape and torch.equal(piece(expert), tensor)
        }
        equals[(kind, local)] = equals.get((kind, local), roles) & roles
        covered.setdefault((kind, local), set()).add(expert)
    names: dict[str, str] = {}
    for role in _ROLES:
        candidates = sorted(
            local for (kind, local), roles in equals.items()
            if kind == "weight" and role in roles and local not in names.values()
        )
        if not candidates:
            return f"no checkpoint tensor equals the {role} projection of every expert"
        names[role] = candidates[0]
    if module.has_bias and any(role not in equals.get(("bias", names[role]), ()) for role in _ROLES):
        return "its checkpoint biases are not named like its weights"
    expected = {(kind, names[role]) for kind in kinds for role in _ROLES}
    if set(equals) != expected or any(covered[key] != set(range(experts)) for key in expected):
        return "its checkpoint tensors are not one per expert and projection"
    return names


def _unfusing_plan(model: nn.Module, name: str, module: nn.Module) -> dict[str, str] | str:
    """The Linear names to unfuse ``module`` into, or why it cannot be unfused."""
    reverted = _checkpoint_tensors(model, name, module)
    if isinstance(reverted, str):
        return reverted
    problem = _forward_problem(module)
    return problem if problem is not None else _role_names(module, reverted)


@torch.no_grad()
def _unfused(module: nn.Module, names: dict[str, str]) -> UnfusedExperts:
    weights = _fused_slices(module, "weight")
    biases = _fused_slices(module, "bias") if module.has_bias else None
    act_fn = module.act_fn
    experts = []
    for index in range(module._parameters["gate_up_proj"].shape[0]):
        linears = {}
        for role in _ROLES:
            weight = weights[role](index)  # [out, in], a view of the fused parameter
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=biases is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=module._parameters["gate_up_proj"].requires_grad)
            if biases is not None:
                linear.bias = nn.Parameter(biases[role](index), requires_grad=linear.weight.requires_grad)
            linears[role] = linear
        experts.append(ExpertMLP(names, linears, act_fn))
    unfused = UnfusedExperts(experts, fused_class=type(module).__name__)
    unfused.train(module.training)
    return unfused


def unfuse_experts_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by an ``UnfusedExperts``, in place.

    Returns the names of the replaced modules (none for a dense model). Every module is checked
    before any is replaced: one that cannot be unfused raises ``ModelLoadError`` naming it and
    why, and leaves the model as it was. The ``nn.Linear`` children of each experts module's
    parent are marked as routers (``llmc.targets.mark_router_``).
    """
    plans: list[tuple[str, nn.Module, dict[str, str]]] = []
    for name, module in find_fused_experts(model):
        names = _unfusing_plan(model, name, module)
        if isinstance(names, str):
            raise ModelLoadError(
                f"{name} ({type(module).__name__}) holds its experts as fused 3-D weights that llmc "
                f"cannot unfuse into Linears: {names}; llmc unfuses the experts of Qwen2-MoE, "
                "Qwen3-MoE, Mixtral, DeepSeek-V3 and other models whose checkpoints name each expert"
            )
        plans.append((name, module, names))
    for name, module, names in plans:
        model.set_submodule(name, _unfused(module, names))
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        for child in parent.children():
            if isinstance(child, nn.Linear):
                mark_router_(child)
    if plans:
        first = plans[0]
        logger.info(
            "unfused %d experts modules (%s, %d experts each) into per-expert Linears %s",
            len(plans), type(first[1]).__name__, len(model.get_submodule(first[0])),
            "/".join(first[2][role] for role in _ROLES),
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
