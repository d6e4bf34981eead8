"""What the pruning modifiers share: parameter validation, target planning, pruning, reporting.

``sparsity`` takes one of three forms (validated when the recipe loads):

* a number in [0, 1): every targeted Linear gets it;
* a list of numbers, one per calibrated block (decoder layer) in order: the Linears inside
  block i get entry i (llm-compressor's per-layer list);
* a mapping ``{target: number}`` whose keys are module names, ``re:`` regexes or class names
  (the ``targets`` syntax): a Linear gets the value of the first key that matches it, and a
  targeted Linear that no key matches is an error (end with ``"re:.*": 0.5`` for a default).

With an N:M ``mask_structure`` the sparsity is 1 − N/M; a ``sparsity`` given with it must agree.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import ArgumentError, CalibrationError
from llmc.masks import apply_mask_, set_sparsity_mask_, sparsity_mask
from llmc.modifier import RunState
from llmc.report import relative_error
from llmc.statistics import GroupSolver, InputGroup, LayerCalibration, Statistic
from llmc.targets import is_match, match_modules
from llmc_sparsity.masks_nm import UNSTRUCTURED, parse_mask_structure, structure_sparsity

logger = logging.getLogger("llmc_sparsity")

__all__ = [
    "BlockwisePruningRun",
    "PruneTarget",
    "apply_kept_mask_",
    "block_of",
    "check_mask_structure",
    "check_sparsity_spec",
    "check_unit_interval",
    "mask_gradients_",
    "mask_weights_",
    "plan_targets",
    "record_module_sparsity",
    "resolve_sparsity",
    "skip_unreached",
    "structure_label",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(value: Any, where: str) -> None:
    if not _is_number(value) or not 0 <= value < 1:
        raise ArgumentError(f"{where} must be a number in [0, 1) (got {value!r})")


def check_unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: a fraction in [0, 1)."""
    _check_fraction(value, f"'{attribute.name}'")


def check_sparsity_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator for ``sparsity``: None, a fraction, a list of them, or {target: fraction}."""
    name = attribute.name
    if value is None:
        return
    if isinstance(value, Mapping):
        if not value:
            raise ArgumentError(f"'{name}' mapping is empty; give {{target: sparsity}} pairs")
        for key, fraction in value.items():
            if not isinstance(key, str):
                raise ArgumentError(f"'{name}' keys must be module names, 're:' patterns or class names (got {key!r})")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as error:
                    raise ArgumentError(f"'{name}' key {key!r} is not a valid regular expression: {error}") from None
            _check_fraction(fraction, f"'{name}[{key!r}]'")
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ArgumentError(f"'{name}' list is empty; give one sparsity per block")
        for index, fraction in enumerate(value):
            _check_fraction(fraction, f"'{name}[{index}]'")
        return
    if not _is_number(value):
        raise ArgumentError(
            f"'{name}' must be a number in [0, 1), a list of them (one per block) or a mapping "
            f"{{target: number}} (got {value!r})"
        )
    _check_fraction(value, f"'{name}'")


def check_mask_structure(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: '0:0' / 'unstructured' or 'N:M' with 0 < N < M."""
    if not isinstance(value, str):
        raise ArgumentError(f"'{attribute.name}' must be a string such as '2:4' (got {value!r})")
    parse_mask_structure(value)


def check_sparsity_matches_structure(sparsity: Any, mask_structure: str) -> None:
    """An N:M structure fixes the sparsity; a sparsity given with it must be 1 − N/M."""
    keep_n, group_m = parse_mask_structure(mask_structure)
    if not group_m or sparsity is None:
        return
    implied = structure_sparsity(keep_n, group_m)
    values = (
        list(sparsity.values()) if isinstance(sparsity, Mapping)
        else list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity]
    )
    for value in values:
        if abs(value - implied) > 1e-9:
            raise ArgumentError(
                f"mask_structure {mask_structure!r} keeps {keep_n} of every {group_m} weights "
                f"(sparsity {implied:g}) but sparsity is {value!r}; leave sparsity out or set "
                f"it to {implied:g}"
            )


@attrs.frozen
class PruneTarget:
    """One Linear a modifier prunes, with its sparsity and the block it belongs to."""

    name: str
    module: torch.nn.Linear
    sparsity: float
    block: str | None


def block_of(name: str, layer_names: Iterable[str]) -> str | None:
    """The calibrated block (``model.layers.3``) that contains module ``name``, if any."""
    for layer in layer_names:
        if name.startswith(f"{layer}."):
            return layer
    return None


def resolve_sparsity(
    spec: Any,
    name: str,
    module: torch.nn.Module,
    block: str | None,
    layer_names: list[str],
    *,
    default: float,
    modifier: str,
) -> float:
    """The sparsity ``spec`` (see module docstring) gives module ``name``."""
    if spec is None:
        return default
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if is_match(name, module, [key]):
                return float(value)
        raise CalibrationError(
            f"{modifier}: no key of sparsity {list(spec)} matches the targeted module {name}; add "
            "a key for it (for example a last catch-all 're:.*': 0.5) or add it to ignore",
            module=name,
        )
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(layer_names):
            raise CalibrationError(
                f"{modifier}: sparsity lists {len(spec)} values but the model has "
                f"{len(layer_names)} blocks; give one value per block"
            )
        if block is None:
            raise CalibrationError(
                f"{modifier}: {name} lies outside the calibrated blocks, so a per-block "
                "sparsity list cannot give it a value; add it to ignore or use a mapping",
                module=name,
            )
        return float(spec[layer_names.index(block)])
    return float(spec)


def plan_targets(
    context: RunContext,
    *,
    modifier: str,
    targets: list[str],
    ignore: list[str],
    sparsity: Any,
    mask_structure: str,
    needs_block: bool,
) -> dict[str, PruneTarget]:
    """Every Linear the modifier prunes, checked before any work (see the module docstring).

    ``needs_block``: the modifier needs calibration inputs, so a module outside the calibrated
    blocks (``lm_head``) cannot be pruned and is refused with the fix.
    """
    keep_n, group_m = parse_mask_structure(mask_structure)
    default = structure_sparsity(keep_n, group_m) if group_m else 0.5
    layer_names = list(context.layer_names)
    plan: dict[str, PruneTarget] = {}
    for name, module in match_modules(context.model, targets, ignore):
        if not isinstance(module, torch.nn.Linear):
            continue
        block = block_of(name, layer_names)
        if needs_block and block is None:
            raise CalibrationError(
                f"{modifier} needs calibration inputs for {name}, which lies outside the "
                f"calibrated blocks; add it to ignore (ignore: [{name}])",
                module=name,
            )
        if group_m and module.in_features % group_m:
            raise CalibrationError(
                f"{modifier}: the input width {module.in_features} of {name} is not a multiple "
                f"of {group_m} ({mask_structure}); add it to ignore or choose another mask_structure",
                module=name,
            )
        value = resolve_sparsity(
            sparsity, name, module, block, layer_names, default=default, modifier=modifier
        )
        plan[name] = PruneTarget(name, module, value, block)
    if not plan:
        raise CalibrationError(
            f"{modifier} targets {targets} (ignoring {ignore}) match no Linear module of this model"
        )
    return plan


@attrs.define
class BlockwisePruningRun(RunState):
    """Run state shared by the pruners that calibrate one block at a time (SparseGPT, Wanda).

    They differ only in the statistic they gather per input (``_input_statistic``) and in how
    they prune an input group's modules from it (``_prune_group``); hooks, input groups,
    padding, early stops and ``true_sequential`` stages are core's ``LayerCalibration``.
    ``config`` is the modifier, with ``targets``, ``ignore``, ``sparsity`` and
    ``mask_structure`` fields (and ``true_sequential`` where the method offers it).
    """

    config: Any
    pending: dict[str, PruneTarget] = attrs.field(factory=dict)
    calibration: LayerCalibration = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.calibration = LayerCalibration(
            input_statistic=self._input_statistic,
            true_sequential=getattr(self.config, "true_sequential", False),
        )

    @property
    def name(self) -> str:
        return type(self.config).recipe_name()

    def llmc_initialize(self, context: RunContext) -> None:
        self.pending = plan_targets(
            context,
            modifier=self.name,
            targets=self.config.targets,
            ignore=self.config.ignore,
            sparsity=self.config.sparsity,
            mask_structure=self.config.mask_structure,
            needs_block=True,
        )
        logger.info("%s: %d Linear modules to prune", self.name, len(self.pending))

    def _input_statistic(self, module: torch.nn.Linear) -> Statistic:
        raise NotImplementedError

    def _prune_group(self, context: RunContext, targets: list[PruneTarget], statistic: Any) -> None:
        """Prune the modules of one input group from the statistic of their shared input."""
        raise NotImplementedError

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        modules = {t.name: t.module for t in self.pending.values() if t.block == layer_name}
        return self.calibration.start(context, layer_name, layer, modules)

    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        self.calibration.finish(context, layer_name, layer, self._solver(context))

    def _solver(self, context: RunContext) -> Callable[[list[InputGroup]], None] | GroupSolver:
        """How a layer's groups are pruned: by ``_prune_groups`` on every rank, unless the
        method splits its solve so that ranks share it (``GroupSolver``)."""
        return lambda groups: self._prune_groups(context, groups)

    def _prune_groups(self, context: RunContext, groups: list[InputGroup]) -> None:
        for group in groups:
            targets = [self.pending.pop(name) for name in group.names if name in self.pending]
            if group.statistic is None:
                for target in targets:
                    skip_unreached(context, target, modifier=self.name, mask_structure=self.config.mask_structure)
                continue
            self._prune_group(context, targets, group.statistic)

    def llmc_finalize(self, context: RunContext) -> None:
        self.pending.clear()


@torch.no_grad()
def apply_kept_mask_(
    context: RunContext,
    target: PruneTarget,
    kept: torch.Tensor,
    *,
    modifier: str,
    mask_structure: str,
    new_weight: torch.Tensor | None = None,
    record: bool = True,
    **extra: Any,
) -> None:
    """Write the pruned weight, record the mask for later modifiers, add the report row.

    ``new_weight`` (float32, already zero where pruned) replaces the weight when the method
    updates the kept weights (SparseGPT); otherwise the weight is only masked. ``record=False``
    leaves the report alone (gradual pruning reports once, when training ends).
    """
    module = target.module
    original = module.weight.detach().clone()
    previous = sparsity_mask(module)
    if previous is not None:  # an earlier pruning step's zeros stay zeros
        kept = kept & previous.to(kept.device)
    if new_weight is not None:
        module.weight.copy_(new_weight.to(module.weight.dtype))
    module.weight.mul_(kept.to(device=module.weight.device, dtype=module.weight.dtype))
    set_sparsity_mask_(module, kept)
    if record:
        record_module_sparsity(
            context, target, modifier=modifier, mask_structure=mask_structure,
            weight_error=relative_error(original, module.weight.detach()), **extra,
        )


def structure_label(mask_structure: str) -> str:
    keep_n, group_m = parse_mask_structure(mask_structure)
    return "unstructured" if (keep_n, group_m) == UNSTRUCTURED else f"{keep_n}:{group_m}"


def record_module_sparsity(
    context: RunContext, target: PruneTarget, *, modifier: str, mask_structure: str, **extra: Any
) -> None:
    """One report row: the sparsity ``target`` reached (from its mask), against its target."""
    kept = sparsity_mask(target.module)
    reached = 0.0 if kept is None else 1.0 - kept.float().mean().item()
    context.record(
        modifier=modifier,
        module=target.name,
        sparsity=round(reached, 6),
        target_sparsity=target.sparsity,
        mask_structure=structure_label(mask_structure),
        **extra,
    )


@torch.no_grad()
def mask_gradients_(targets: Iterable[PruneTarget]) -> None:
    """Zero the gradients of pruned weights, so the optimizer's step leaves them alone."""
    for target in targets:
        kept = sparsity_mask(target.module)
        grad = target.module.weight.grad
        if kept is not None and grad is not None:
            grad.mul_(kept.to(grad.dtype))


@torch.no_grad()
def mask_weights_(targets: Iterable[PruneTarget]) -> None:
    """Put pruned weights back to exactly zero (weight decay and momentum move them)."""
    for target in targets:
        apply_mask_(target.module)


def skip_unreached(context: RunContext, target: PruneTarget, *, modifier: str, mask_structure: str) -> None:
    """Leave a module no calibration token reached dense (an MoE expert never routed), and say so."""
    logger.warning(
        "%s: no calibration token reached %s; it is left dense (add samples that reach it)",
        modifier, target.name,
    )
    context.record(
        modifier=modifier, module=target.name, sparsity=0.0, target_sparsity=target.sparsity,
        mask_structure=structure_label(mask_structure), skipped="no calibration tokens reached it",
    )
