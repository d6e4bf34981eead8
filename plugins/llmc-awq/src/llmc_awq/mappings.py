"""Mappings: which module's output a group of Linears reads, so scales can be folded into it.

A recipe may give them in llm-compressor's syntax (``MappingSpec``: a ``smooth_layer`` pattern
and ``balance_layers`` patterns, or SmoothQuant's ``[[balance...], smooth]`` lists); otherwise
``llmc_awq.discovery`` finds them from the layer's data flow. Either way a layer's mappings are
``Mapping`` records with full module names, in the order the layer runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from llmc.errors import ArgumentError, CalibrationError, closest
from llmc.targets import is_match
from llmc_awq.folding import Producer

__all__ = [
    "Mapping",
    "MappingSpec",
    "check_specs_match",
    "mapping_specs",
    "parent_of",
    "resolve_specs",
]


@attrs.frozen
class MappingSpec:
    """One mapping as a recipe writes it: patterns (module names or ``re:`` expressions).

    ``activation_hook_target`` (llm-compressor's, for parallel blocks) names the module,
    relative to the balance layers' common parent, whose input is the group's activation.
    """

    smooth_layer: str
    balance_layers: tuple[str, ...]
    activation_hook_target: str | None = None


@attrs.frozen
class Mapping:
    """Scales folded into ``smooth`` (as ``producer`` says) and balanced by ``balance``.

    ``parent`` is the module whose output the AWQ search compares (the balance modules' lowest
    common ancestor that is not a ``ModuleList``: ``self_attn`` for q/k/v, ``o_proj`` for
    itself); ``statistic_of`` is the module whose input is the group's activation.
    """

    smooth: str
    producer: Producer
    balance: tuple[str, ...]
    parent: str
    statistic_of: str

    def renamed(self, old_layer: str, new_layer: str) -> Mapping:
        """The same mapping in another layer of the same kind (``layers.0`` → ``layers.5``)."""

        def move(name: str) -> str:
            if name == old_layer:
                return new_layer
            return new_layer + name[len(old_layer):] if name.startswith(old_layer + ".") else name

        return attrs.evolve(
            self,
            smooth=move(self.smooth),
            balance=tuple(move(n) for n in self.balance),
            parent=move(self.parent),
            statistic_of=move(self.statistic_of),
        )


def _spec(item: Any, index: int) -> MappingSpec:
    where = f"mapping {index}"
    if isinstance(item, MappingSpec):
        return item
    if isinstance(item, dict):
        unknown = [k for k in item if k not in ("smooth_layer", "balance_layers", "activation_hook_target")]
        if unknown:
            hint = closest(str(unknown[0]), ["smooth_layer", "balance_layers", "activation_hook_target"])
            raise ArgumentError(
                f"'mappings': {where} has an unknown key {unknown[0]!r}"
                + (f"; did you mean {hint!r}?" if hint else "; the keys are smooth_layer, balance_layers"),
                name="mappings",
            )
        smooth, balance = item.get("smooth_layer"), item.get("balance_layers")
        target = item.get("activation_hook_target")
    elif isinstance(item, (list, tuple)) and len(item) == 2:  # SmoothQuant: [[balance...], smooth]
        balance, smooth = item
        target = None
    else:
        raise ArgumentError(
            f"'mappings': {where} must be {{smooth_layer: ..., balance_layers: [...]}} or "
            f"[[balance layers...], smooth layer] (got {item!r})",
            name="mappings",
        )
    if isinstance(balance, str):
        balance = [balance]
    if not isinstance(smooth, str) or not smooth:
        raise ArgumentError(f"'mappings': {where} needs a smooth_layer name or 're:' pattern (got {smooth!r})", name="mappings")
    if not isinstance(balance, (list, tuple)) or not balance or not all(isinstance(b, str) and b for b in balance):
        raise ArgumentError(
            f"'mappings': {where} needs balance_layers, a non-empty list of names or 're:' patterns (got {balance!r})",
            name="mappings",
        )
    if target is not None and not isinstance(target, str):
        raise ArgumentError(f"'mappings': {where} activation_hook_target must be a module path (got {target!r})", name="mappings")
    return MappingSpec(smooth_layer=smooth, balance_layers=tuple(balance), activation_hook_target=target)


def mapping_specs(value: Any) -> tuple[MappingSpec, ...] | None:
    """Converter of the ``mappings`` parameter: None (discover them), or the recipe's list."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ArgumentError(
            f"'mappings' must be a non-empty list of mappings, or null to find them from the model (got {value!r})",
            name="mappings",
        )
    return tuple(_spec(item, index) for index, item in enumerate(value))


def _pattern_text(pattern: str) -> str:
    text = pattern.removeprefix("re:")
    for token in (".*", "^", "$", "\\", "(", ")", "?", "+", "[", "]"):
        text = text.replace(token, "")
    return text.strip(".")


def check_specs_match(model: torch.nn.Module, specs: Sequence[MappingSpec]) -> None:
    """Refuse a mapping pattern that names no module of ``model``, with the closest names."""
    modules = list(model.named_modules())
    # compare against names with their block index taken out, so 'input_layrnorm' meets
    # 'input_layernorm' rather than one of forty 'model.layers.N.input_layernorm'
    local = sorted({name.split(".", 3)[-1] if name.count(".") >= 3 else name for name, _ in modules if name})
    for index, spec in enumerate(specs):
        for role, pattern in [("smooth_layer", spec.smooth_layer)] + [("balance_layers", p) for p in spec.balance_layers]:
            if any(is_match(name, module, [pattern]) for name, module in modules if name):
                continue
            hint = closest(_pattern_text(pattern), local)
            raise CalibrationError(
                f"AWQ/SmoothQuant mapping {index}: {role} {pattern!r} matches no module of "
                f"{type(model).__name__}"
                + (f"; did you mean a pattern for {hint!r}?" if hint else "; check the module names with print(model)")
            )


def parent_of(layer: torch.nn.Module, layer_name: str, names: Iterable[str]) -> str:
    """The lowest common ancestor of ``names`` under ``layer`` that is not a ``ModuleList``.

    A ``ModuleList`` (the list of experts) is skipped: nothing calls its forward with the
    tokens the block received, so its output is not one the search can compare.
    """
    prefix = f"{layer_name}."
    parts = [name.removeprefix(prefix).split(".") for name in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    while common:
        module = layer.get_submodule(".".join(common))
        if not isinstance(module, torch.nn.ModuleList):
            return prefix + ".".join(common)
        common.pop()
    return layer_name


def _producer_of(module: torch.nn.Module, width: int) -> Producer | str:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "it has no weight to fold scales into"
    if weight.ndim == 1:
        return Producer("norm") if weight.numel() == width else f"its weight has {weight.numel()} channels, the group reads {width}"
    if weight.ndim == 2 and weight.shape[0] >= width:
        # a fused producer (qkv_proj → o_proj): its last rows feed the group, as llm-compressor assumes
        return Producer("linear", offset=weight.shape[0] - width)
    return f"its output has {weight.shape[0]} channels, the group reads {width}"


def resolve_specs(
    layer: torch.nn.Module, layer_name: str, specs: Sequence[MappingSpec]
) -> tuple[list[Mapping], list[str]]:
    """The recipe's mappings inside one layer, and a reason for each one skipped there."""
    named = [(f"{layer_name}.{n}" if n else layer_name, m) for n, m in layer.named_modules()]
    mappings: list[Mapping] = []
    skipped: list[str] = []
    for index, spec in enumerate(specs):
        smooth = [name for name, module in named if is_match(name, module, [spec.smooth_layer])]
        balance = [
            name for name, module in named
            if is_match(name, module, spec.balance_layers) and name not in smooth
        ]
        if not smooth or not balance:
            continue  # this layer has no such modules (another kind of layer does)
        if len(smooth) > 1:
            raise CalibrationError(
                f"mapping {index}: smooth_layer {spec.smooth_layer!r} matches {len(smooth)} modules "
                f"of {layer_name} ({', '.join(smooth[:3])}); it must match one per layer"
            )
        modules = dict(named)
        widths = {modules[name].weight.shape[1] for name in balance if getattr(modules[name], "weight", None) is not None}
        if len(widths) != 1:
            skipped.append(f"mapping {index} at {smooth[0]}: its balance layers read inputs of different widths {sorted(widths)}")
            continue
        producer = _producer_of(modules[smooth[0]], widths.pop())
        if isinstance(producer, str):
            skipped.append(f"mapping {index}: cannot fold scales into {smooth[0]}: {producer}")
            continue
        parent = parent_of(layer, layer_name, balance)
        statistic_of = balance[0]
        if spec.activation_hook_target:
            statistic_of = f"{parent}.{spec.activation_hook_target}"
            if statistic_of not in modules:
                raise CalibrationError(
                    f"mapping {index}: activation_hook_target {spec.activation_hook_target!r} is not a "
                    f"module of {parent}"
                )
        mappings.append(Mapping(smooth[0], producer, tuple(balance), parent, statistic_of))
    return mappings, skipped
