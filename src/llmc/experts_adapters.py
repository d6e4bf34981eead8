"""Experts adapters: how one family of fused experts modules is cut into per-expert Linears.

``llmc.moe`` replaces each fused experts module by per-expert Linears. What differs between
architectures is only *how* to cut: where each expert's gate, up and down weights (and biases)
lie in the fused tensors, what joins gate and up, how tokens reach the experts and what the
checkpoints call each Linear. An ``ExpertsAdapter`` answers that for one family and returns an
``ExpertsLayout``; everything else (the modules, calibration, saving) is shared.

Adapters are registered through the plugin API (``llmc_register_experts_adapters``); core's
own are registered by ``llmc.builtin`` the same way:

* ``transformers``: any module following transformers 5's experts convention
  (``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, the
  default ``act_fn(gate) * up``); the per-expert names come from transformers' own save-time
  conversion, so they are the names its loader merges from (Qwen2-MoE, Qwen3-MoE, Mixtral,
  DeepSeek-V3 and others). It claims modules by structure, not by class.
* ``gpt_oss``: ``GptOssExperts`` (``gate_up_proj [E, H, 2I]`` with gate and up columns
  interleaved, ``down_proj [E, I, H]``, biases, a clamped SwiGLU). transformers reads GPT-OSS
  checkpoints only with the experts fused; llmc writes per-expert Linears as llm-compressor
  does, and ``llmc.models.load_model`` reads them back.
* ``llama4``: ``Llama4TextExperts`` (``gate_up_proj [E, H, 2I]``, gate then up, ``down_proj
  [E, I, H]``), whose input is every token once per expert, already multiplied by its routing
  score. transformers loads quantized per-expert Llama 4 checkpoints by swapping the module
  for a list of ``Llama4TextMLP`` (``transformers.quantizers.base``), whose names these are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import ClassVar

import attrs
import torch
from torch import nn

__all__ = [
    "ROLES",
    "ROUTINGS",
    "ClampedSwiGLU",
    "ExpertsAdapter",
    "ExpertsLayout",
    "GatedActivation",
    "GptOssExpertsAdapter",
    "Llama4ExpertsAdapter",
    "TransformersExpertsAdapter",
]

ROLES = ("gate", "up", "down")
# How tokens reach the experts: ``routed`` is forward(hidden [T, H], top_k_index [T, K],
# top_k_weights [T, K]) -> [T, H]; ``stacked`` is forward(stacked [E * T, H]) -> [E * T, H], every
# token once per expert, scaled by its routing score beforehand (zero when not routed).
ROUTINGS = ("routed", "stacked")
_PER_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Set on an experts module's instance by transformers' @use_experts_implementation.
_CONVENTION = ("has_gate", "has_bias", "is_transposed")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<local>[A-Za-z_]\w*)\.(?P<kind>weight|bias)$")

Slicer = Callable[[str, int], torch.Tensor]


class GatedActivation(nn.Module):
    """``act_fn(gate) * up``, the gate of most gated MLPs."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's gate: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``.

    The clamps keep the product bounded; the ``+ 1`` lets an expert pass its gate through when
    ``up`` is zero (``GptOssExperts._apply_gate`` in transformers).
    """

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.limit = float(limit)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


@attrs.frozen(kw_only=True)
class ExpertsLayout:
    """One fused experts module, as its per-expert Linears.

    ``weight(role, expert)`` is the ``[out, in]`` matrix of one expert's ``gate``, ``up`` or
    ``down`` projection (``bias(role, expert)`` its bias, or ``bias`` None), a view of the fused
    tensors where their layout allows; ``names`` maps each role to the Linear's name in the
    checkpoint; ``act_fn(gate, up)`` joins the two projections; ``routing`` is one of
    ``ROUTINGS`` (``stacked`` only without biases).
    """

    experts: int
    names: Mapping[str, str]
    weight: Slicer
    bias: Slicer | None
    act_fn: nn.Module
    routing: str = attrs.field(default="routed", validator=attrs.validators.in_(ROUTINGS))

    def __attrs_post_init__(self) -> None:
        if self.routing == "stacked" and self.bias is not None:
            # an unrouted token is a zero row, skipped because a bias-free expert maps it to zero
            raise ValueError("an experts layout with stacked routing cannot have biases")


class ExpertsAdapter:
    """How to unfuse one family of fused experts modules (subclass it and register the class).

    ``adapter_name`` is its public name (in errors and ``llmc plugins``); ``experts_classes``
    names the module classes it handles. An adapter naming no class claims modules by
    structure and is tried only for a class no adapter names.
    """

    adapter_name: ClassVar[str] = ""
    experts_classes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def layout(cls, model: nn.Module, name: str, module: nn.Module) -> ExpertsLayout | str:
        """The layout of ``module`` (full name ``name`` in ``model``), or why it cannot be unfused."""
        raise NotImplementedError


def _parameter(module: nn.Module, name: str, dims: int) -> torch.Tensor | None:
    tensor = module._parameters.get(name)
    return tensor.data if isinstance(tensor, torch.Tensor) and tensor.dim() == dims else None


def _transposed_layout(module: nn.Module, split: Callable[[torch.Tensor, str], torch.Tensor]) -> tuple[Slicer, Slicer | None] | str:
    """Slicers for ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` (``x @ W`` layouts);
    ``split(last_dim_tensor, role)`` picks gate's or up's part of the last dimension."""
    gate_up, down = _parameter(module, "gate_up_proj", 3), _parameter(module, "down_proj", 3)
    if gate_up is None or down is None:
        return "it has no 3-D gate_up_proj and down_proj"
    experts, hidden, double_width = gate_up.shape
    if double_width % 2 or tuple(down.shape) != (experts, double_width // 2, hidden):
        return (
            f"its weights have shapes gate_up_proj {list(gate_up.shape)} and down_proj "
            f"{list(down.shape)}, not [E, H, 2I] and [E, I, H]"
        )

    def weight(role: str, expert: int) -> torch.Tensor:
        if role == "down":
            return down[expert].T  # [H, I]
        return split(gate_up[expert], role).T  # [H, I] -> [I, H]

    gate_up_bias, down_bias = _parameter(module, "gate_up_proj_bias", 2), _parameter(module, "down_proj_bias", 2)
    if gate_up_bias is None and down_bias is None:
        return weight, None
    if gate_up_bias is None or down_bias is None or gate_up_bias.shape != (experts, double_width) or down_bias.shape != (experts, hidden):
        return f"its biases are not gate_up_proj_bias [{experts}, {double_width}] and down_proj_bias [{experts}, {hidden}]"

    def bias(role: str, expert: int) -> torch.Tensor:
        return down_bias[expert] if role == "down" else split(gate_up_bias[expert], role)

    return weight, bias


class GptOssExpertsAdapter(ExpertsAdapter):
    """GPT-OSS: gate and up interleaved along the last dimension (gate ``0::2``, up ``1::2``)."""

    adapter_name = "gpt_oss"
    experts_classes = ("GptOssExperts",)

    @classmethod
    def layout(cls, model: nn.Module, name: str, module: nn.Module) -> ExpertsLayout | str:
        slicers = _transposed_layout(module, lambda tensor, role: tensor[..., 0::2] if role == "gate" else tensor[..., 1::2])
        if isinstance(slicers, str):
            return slicers
        if not all(isinstance(getattr(module, attribute, None), (int, float)) for attribute in ("alpha", "limit")):
            return "it has no numeric alpha and limit for its clamped SwiGLU"
        weight, bias = slicers
        return ExpertsLayout(
            experts=module.gate_up_proj.shape[0], names=_PER_EXPERT_NAMES, weight=weight, bias=bias,
            act_fn=ClampedSwiGLU(module.alpha, module.limit),
        )


class Llama4ExpertsAdapter(ExpertsAdapter):
    """Llama 4: gate then up along the last dimension; tokens arrive stacked and pre-scaled."""

    adapter_name = "llama4"
    experts_classes = ("Llama4TextExperts",)

    @classmethod
    def layout(cls, model: nn.Module, name: str, module: nn.Module) -> ExpertsLayout | str:
        def split(tensor: torch.Tensor, role: str) -> torch.Tensor:
            width = tensor.shape[-1] // 2
            return tensor[..., :width] if role == "gate" else tensor[..., width:]

        slicers = _transposed_layout(module, split)
        if isinstance(slicers, str):
            return slicers
        if not callable(getattr(module, "act_fn", None)):
            return "it has no act_fn"
        weight, bias = slicers
        return ExpertsLayout(
            experts=module.gate_up_proj.shape[0], names=_PER_EXPERT_NAMES, weight=weight, bias=bias,
            act_fn=GatedActivation(module.act_fn), routing="stacked",
        )


class TransformersExpertsAdapter(ExpertsAdapter):
    """transformers 5's experts convention, by structure (see the module docstring)."""

    adapter_name = "transformers"

    @classmethod
    def layout(cls, model: nn.Module, name: str, module: nn.Module) -> ExpertsLayout | str:
        reverted = _checkpoint_tensors(model, name, module)
        if isinstance(reverted, str):
            return reverted
        problem = _forward_problem(module)
        if problem is not None:
            return problem
        weight, bias = _fused_slicers(module)
        names = _role_names(module, reverted, weight, bias)
        if isinstance(names, str):
            return names
        return ExpertsLayout(
            experts=module.gate_up_proj.shape[0], names=names, weight=weight, bias=bias,
            act_fn=GatedActivation(module.act_fn),
        )


def _forward_problem(module: nn.Module) -> str | None:
    """Why the fused forward is not ``down(act_fn(gate) * up)`` on ``[E, 2I, H]``, or None."""
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
    gate_up, down = _parameter(module, "gate_up_proj", 3), _parameter(module, "down_proj", 3)
    if gate_up is None or down is None:
        return "it has no 3-D gate_up_proj and down_proj"
    experts, double_width, hidden = gate_up.shape
    if double_width % 2 or tuple(down.shape) != (experts, hidden, double_width // 2):
        return (
            f"its weights have shapes gate_up_proj {list(gate_up.shape)} and down_proj "
            f"{list(down.shape)}, not [E, 2I, H] and [E, H, I]"
        )
    if module.has_bias:
        for bias_name, shape in (("gate_up_proj_bias", (experts, double_width)), ("down_proj_bias", (experts, hidden))):
            bias = module._parameters.get(bias_name)
            if bias is None or tuple(bias.shape) != shape:
                return f"it has no {bias_name} of shape {list(shape)}"
    return None


def _fused_slicers(module: nn.Module) -> tuple[Slicer, Slicer | None]:
    """Each role's tensor of one expert in ``[E, 2I, H]`` / ``[E, H, I]``, views of the fused ones."""

    def slicer(suffix: str) -> Slicer:
        gate_up = module._parameters[f"gate_up_proj{suffix}"].data  # [E, 2I, H] or [E, 2I]
        down = module._parameters[f"down_proj{suffix}"].data  # [E, H, I] or [E, H]
        width = gate_up.shape[1] // 2
        pieces = {"gate": lambda e: gate_up[e, :width], "up": lambda e: gate_up[e, width:], "down": lambda e: down[e]}
        return lambda role, expert: pieces[role](expert)

    return slicer(""), slicer("_bias") if module.has_bias else None


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


def _role_names(
    module: nn.Module, reverted: dict[str, torch.Tensor], weight: Slicer, bias: Slicer | None
) -> dict[str, str] | str:
    """Each role's per-expert Linear name, by matching each checkpoint tensor to the fused slice
    it equals (a layout other than the plain split of ``[E, 2I, H]`` matches nothing)."""
    experts = module._parameters["gate_up_proj"].shape[0]
    slicers = {"weight": weight, **({"bias": bias} if bias is not None else {})}
    equals: dict[tuple[str, str], set[str]] = {}  # (kind, local name) -> roles equal for every expert
    covered: dict[tuple[str, str], set[int]] = {}
    for key, tensor in reverted.items():
        match = _EXPERT_KEY.match(key)
        kind, local, expert = match["kind"], match["local"], int(match["expert"])
        if kind not in slicers or expert >= experts:
            return "its checkpoint tensors are not one per expert and projection"
        roles = set()
        for role in ROLES:
            piece = slicers[kind](role, expert)
            if piece.shape == tensor.shape and torch.equal(piece, tensor):
                roles.add(role)
        equals[(kind, local)] = equals.get((kind, local), roles) & roles
        covered.setdefault((kind, local), set()).add(expert)
    names: dict[str, str] = {}
    for role in ROLES:
        candidates = sorted(
            local for (kind, local), roles in equals.items()
            if kind == "weight" and role in roles and local not in names.values()
        )
        if not candidates:
            return f"no checkpoint tensor equals the {role} projection of every expert"
        names[role] = candidates[0]
    if bias is not None and any(role not in equals.get(("bias", names[role]), ()) for role in ROLES):
        return "its checkpoint biases are not named like its weights"
    kinds = tuple(slicers)
    expected = {(kind, names[role]) for kind in kinds for role in ROLES}
    if set(equals) != expected or any(covered[key] != set(range(experts)) for key in expected):
        return "its checkpoint tensors are not one per expert and projection"
    return names
