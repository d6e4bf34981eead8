"""Calibration statistics of a layer's Linears: one mechanism for every data-driven modifier.

GPTQ and SparseGPT need the Hessian of each Linear's input, Wanda its column norms, AWQ and
observers will need activation ranges; all of them gather a statistic per input from forward
hooks during the pipeline's calibration pass. This module is the one place that

* **groups modules by input**: Linears that read the very same tensor (q/k/v read the normed
  hidden states, gate/up the post-attention ones) form an *input group* and share one statistic
  (one Hessian product instead of three). The grouping is found from the data flow during the
  first batch, never from module names, so new architectures need no table;
* **filters padding**: ``real_tokens`` drops padded positions (``context.attention_mask``);
* **stops the forward once everything is collected** (``StopLayerForward``), unless another
  hook on the layer may need the rest of it;
* **runs true-sequential stages**: with ``true_sequential`` each input group is solved in data
  flow order and the layer re-run in between, so a group's statistic comes from the outputs of
  the already-compressed groups before it;
* **shares a statistic between modifiers**: two modifiers of one stage calibrating the same
  Linears in the pipeline's pass (SparseGPT 2:4 then GPTQ W4: both want each group's Hessian)
  get one statistic object, gathered once, when it offers a ``share_key`` (the Hessian does):
  the first pass to hook the layer updates it, the others read it. Their results are the
  ones two identical statistics gave, with one product per group instead of two;
* **finalizes**: ``LayerCalibration.finish`` is where a layer's statistics are complete and
  handed to the modifier's solver. Every statistic implements ``Statistic`` (``update``,
  ``merge``, ``finalize``), so a distributed run (``llmc.distributed``) reduces them all in one
  place, when a pass's groups are read (``StatisticsPass.groups``);
* **shares the solves**: a modifier that splits its solve into ``GroupSolver(compute, apply)``
  has a layer's groups computed on several ranks at once, the results sent to all; with a
  ``batch_key`` and ``compute_batch`` groups of one key (MoE experts of one shape) are
  computed as one batched solve.

A modifier holds one ``LayerCalibration`` in its run state and calls ``start`` from
``llmc_layer_start`` and ``finish`` from ``llmc_layer_end``; see ``docs/plugins.md``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch

from llmc.context import RunContext
from llmc.distributed import (
    RowSplit,
    check_same_everywhere,
    reduce_statistics,
    solve_groups,
    world_size,
)
from llmc.errors import ArgumentError, CalibrationError
from llmc.pipeline import StopLayerForward
from llmc.torch_hooks import has_foreign_hooks

__all__ = [
    "MAX_STAGES",
    "STOP_POLICIES",
    "GroupSolver",
    "InputGroup",
    "LayerCalibration",
    "Statistic",
    "StatisticsPass",
    "calibration_stages",
    "real_tokens",
    "same_tensor",
]

logger = logging.getLogger("llmc.statistics")

# A layer with more input groups than this (a mixture of experts: one group per expert) is done
# in two true-sequential stages, the first group and then all others, not one pass per expert.
MAX_STAGES = 8
STOP_POLICIES = ("always", "if-alone", "never")

# layer -> (leader module name, share_key) -> (owning pass, its group index, the statistic):
# the statistics a pass gathers that later passes over the same layer may read instead
_SHARED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, Hashable], tuple[Any, int, Any]]] = (
    weakref.WeakKeyDictionary()
)


@runtime_checkable
class Statistic(Protocol):
    """What a calibration statistic implements (a Hessian, column norms, an output energy).

    ``tokens`` counts the (unpadded) tokens folded in. ``update`` folds one batch in;
    ``merge`` folds in another statistic of the same input gathered elsewhere (another rank,
    another shard of the data), so that merging the parts equals gathering the whole;
    ``finalize`` returns the value a solver uses. A statistic made of sums over tokens may also
    offer ``shard_sums() -> list[Tensor]``: its tensors that add up across data shards, which a
    distributed run then sums in place (with ``tokens``) instead of gathering whole statistics.
    A statistic that another modifier's pass may read instead of gathering its own offers
    ``share_key``: equal keys of one input promise equal statistics (and a ``release`` that
    frees only once every reader released it).
    """

    tokens: int

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...

    def merge(self, other: Any) -> None: ...

    def finalize(self) -> Any: ...


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as ``[tokens, features]`` without its padded positions.

    ``mask`` is the batch's attention mask (``[batch, seq]``, 1 = real token); it applies when it
    has one entry per token of ``x``. An MoE expert's Linear sees all tokens of the batch when
    every expert is calibrated on every token (``llmc.moe``), and the mask applies; with routed
    calibration it sees the tokens routed to it in ascending order, a subset the mask cannot
    name, taken whole (padding included) unless it is every token, in order.
    """
    x = x.reshape(-1, x.shape[-1])  # [tokens, features]
    if mask is not None and mask.numel() == x.shape[0] and not bool(mask.all()):
        x = x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
    return x


def same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether ``a`` and ``b`` are the same values in the same memory (the same object, or a
    view of it with the same layout), so a statistic of one is a statistic of the other.

    Empty tensors hold no memory (their addresses coincide), so two of them are the same only
    when they are one object: the inputs of two MoE experts that no token reached are not.
    """
    if b is None:
        return False
    return a is b or (
        a.numel() > 0
        and a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


@attrs.define
class InputGroup:
    """The target Linears that read one input tensor, with what was gathered for them.

    ``statistic`` is the input's statistic, None when no calibration token reached the group
    (an MoE expert never routed to); ``outputs`` holds per-module output statistics, for the
    modules that asked for one and received tokens.
    """

    index: int
    names: list[str]
    statistic: Statistic | None
    outputs: dict[str, Statistic] = attrs.field(factory=dict)


class StatisticsPass:
    """Hooks for one pass of the calibration batches through a layer.

    ``layout`` lists the input groups in the order they run; when it is None it is found on the
    first batch (a module whose input is the tensor an earlier module received joins that
    module's group) and checked on every later batch. ``collect`` holds the indices of the
    groups whose statistics are gathered, None for all. ``input_statistic(module)`` makes the
    statistic of a group's input (created when the group's first module first runs);
    ``output_statistic(module)`` may give a module a statistic of its outputs (or None).

    Once every module of the collected groups has received its input (and produced its output,
    where an output statistic needs it), the rest of the batch's forward is of no use and is cut
    short with ``StopLayerForward``. ``stop``: "always" (re-runs a modifier makes itself),
    "if-alone" (the pipeline's own calibration pass: only when no other hook is on the layer,
    since another modifier may need the rest of it) or "never".
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        modules: Mapping[str, torch.nn.Linear],
        context: RunContext,
        *,
        input_statistic: Callable[[torch.nn.Linear], Statistic],
        output_statistic: Callable[[torch.nn.Linear], Statistic | None] | None = None,
        layout: list[list[str]] | None = None,
        collect: set[int] | None = None,
        stop: str = "if-alone",
    ) -> None:
        if stop not in STOP_POLICIES:
            raise ArgumentError(f"'stop' must be one of {', '.join(STOP_POLICIES)} (got {stop!r})", name="stop")
        self.layer = layer
        self.modules = dict(modules)
        self.context = context
        self.layout = [list(group) for group in layout] if layout is not None else None
        self.collect = collect
        self.stop = stop
        self._input_statistic = input_statistic
        self.inputs: dict[int, Statistic] = {}  # group index -> statistic of its input
        self.outputs: dict[str, Statistic] = {}
        if output_statistic is not None:
            for name, module in self.modules.items():
                statistic = output_statistic(module)
                if statistic is not None:
                    self.outputs[name] = statistic
        self.group_of: dict[str, int] = {}
        if self.layout is not None:
            self.group_of = {name: index for index, group in enumerate(self.layout) for name in group}
        self.discovering = layout is None
        self._discovered = layout is None  # so each rank found it on its own data
        self._batches = 0
        self._held: list[torch.Tensor] = []  # first batch's group inputs while discovering
        self._last_input: dict[int, torch.Tensor] = {}  # group -> its leader's input this batch
        self._seen: set[str] = set()  # collected modules whose input this batch has reached
        self._fired: set[str] = set()  # ... and whose output
        self._collected: int | None = None
        self._alone: bool | None = None
        self._reduced: set[int] = set()  # groups whose statistics hold every rank's data
        self._borrowed: dict[int, tuple[StatisticsPass, int]] = {}  # group -> (owner pass, its index)
        self._shared_keys: list[tuple[str, Hashable]] = []  # statistics this pass lends
        self._handles = [layer.register_forward_pre_hook(self._new_batch)]
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._before(name)))
            self._handles.append(module.register_forward_hook(self._after(name)))

    def remove(self) -> list[list[str]]:
        """Remove the hooks; return the layout (modules that never ran form a last group)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        lent = _SHARED.get(self.layer, {})
        for key in self._shared_keys:
            lent.pop(key, None)
        self._shared_keys.clear()
        self._held.clear()
        self._last_input.clear()
        layout = self.layout if self.layout is not None else []
        unseen = [name for name in self.modules if name not in self.group_of]
        if unseen:
            self.group_of.update({name: len(layout) for name in unseen})
            layout.append(unseen)
        self.layout = layout
        return layout

    def groups(self, indices: set[int] | None = None) -> list[InputGroup]:
        """The input groups (all, or those in ``indices``) with their statistics, in order."""
        assert self.layout is not None, "groups() is read after remove()"
        chosen = range(len(self.layout)) if indices is None else sorted(indices)
        self._reduce([index for index in chosen if self._collects(index) and index not in self._reduced])
        groups = []
        for index in chosen:
            names = self.layout[index]
            statistic = self.inputs.get(index)
            if statistic is not None and not statistic.tokens:
                statistic = None
            outputs = {n: self.outputs[n] for n in names if n in self.outputs and self.outputs[n].tokens}
            groups.append(InputGroup(index, list(names), statistic, outputs))
        return groups

    def _reduce(self, indices: list[int]) -> None:
        """Make the statistics of ``indices`` those of every rank's data (``llmc.distributed``)."""
        self._reduced.update(indices)
        if world_size() == 1 or not indices:
            return
        assert self.layout is not None
        if self._discovered:
            check_same_everywhere(self.layout, "the input groups found from the first batch")
            self._discovered = False
        parts: list[Statistic | None] = []
        makers: list[Callable[[], Statistic]] = []
        slots: list[tuple[str, Any]] = []
        for index in indices:
            leader = self.modules[self.layout[index][0]]
            parts.append(self.inputs.get(index))
            makers.append(lambda module=leader: self._input_statistic(module))
            slots.append(("input", index))
            for name in self.layout[index]:
                if name in self.outputs:
                    parts.append(self.outputs[name])
                    makers.append(lambda statistic=self.outputs[name]: statistic)
                    slots.append(("output", name))
        layer = next(iter(self.modules), "a layer").rpartition(".")[0]
        reduced = reduce_statistics(parts, makers, self.context.device, f"reducing the statistics of {layer}")
        for (kind, key), statistic in zip(slots, reduced):
            if kind == "input":
                if statistic is None:
                    self.inputs.pop(key, None)
                else:
                    self.inputs[key] = statistic
            elif statistic is not None:
                self.outputs[key] = statistic

    # --- hooks ---

    def _collects(self, index: int) -> bool:
        return index >= 0 and (self.collect is None or index in self.collect)

    def _collected_count(self) -> int:
        if self._collected is None:
            assert self.layout is not None
            self._collected = sum(len(g) for i, g in enumerate(self.layout) if self._collects(i))
        return self._collected

    def _may_stop(self) -> bool:
        if self.stop == "always":
            return True
        if self.stop == "never":
            return False
        if self._alone is None:
            self._alone = not has_foreign_hooks(self.layer, {handle.id for handle in self._handles})
        return self._alone

    def _new_batch(self, *_: Any) -> None:
        self._batches += 1
        self._seen.clear()
        self._fired.clear()
        self._last_input.clear()
        if self.discovering and self._batches == 2:
            self.discovering = False
            self._held.clear()

    def _group(self, name: str, x: torch.Tensor) -> tuple[int, bool]:
        """``(group index, whether this module leads its group)`` for an input ``x``."""
        if self.discovering and self._batches == 1 and name not in self.group_of:
            if self.layout is None:
                self.layout = []
            for index, held in enumerate(self._held):
                if same_tensor(x, held):
                    self.layout[index].append(name)
                    self.group_of[name] = index
                    return index, False
            self._held.append(x)  # held, so its memory cannot be reused by another tensor
            self.layout.append([name])
            self.group_of[name] = len(self.layout) - 1
            return len(self.layout) - 1, True
        index = self.group_of.get(name, -1)
        return index, index >= 0 and self.layout[index][0] == name

    def _before(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if not args:
                return
            x = args[0]
            index, leads = self._group(name, x)
            if not self._collects(index):
                return
            if leads:
                if index not in self.inputs:
                    self.inputs[index] = self._new_input_statistic(module, name, index)
                if index in self._borrowed:
                    self._check_lender_saw(name, index, x)
                else:
                    self.inputs[index].update(x.detach(), self.context.attention_mask)
                self._last_input[index] = x
            elif not same_tensor(x, self._last_input.get(index)):
                leader = self.layout[index][0]
                raise CalibrationError(
                    f"{name} shared its input with {leader} on the first calibration batch but "
                    "not on a later one; their statistics cannot be shared",
                    module=name,
                )
            self._seen.add(name)
            if (
                not self.discovering
                and len(self._seen) == self._collected_count()
                and name not in self.outputs  # its output is not needed
                and self._may_stop()
            ):
                raise StopLayerForward

        return hook

    def _new_input_statistic(self, module: torch.nn.Linear, name: str, index: int) -> Statistic:
        """A new statistic of group ``index``'s input, or the equal one an earlier pass over the
        layer gathers from the same forwards (another modifier's pipeline pass), to read.

        Shared only between pipeline passes (every group collected, ``stop`` "if-alone": the
        passes see the same batches) in one process (a distributed run reduces each pass's
        statistics in place, once per pass)."""
        statistic = self._input_statistic(module)
        key = getattr(statistic, "share_key", None)
        if key is None or self.collect is not None or self.stop != "if-alone" or world_size() > 1:
            return statistic
        lent = _SHARED.setdefault(self.layer, {})
        entry = lent.get((name, key))
        if entry is not None and entry[0] is not self and entry[0]._handles:
            owner, owner_index, shared = entry
            if owner._batches == self._batches == 1:  # both on the pass's first forward
                self._borrowed[index] = (owner, owner_index)
                shared.readers += 1
                return shared
        lent[(name, key)] = (self, index, statistic)
        self._shared_keys.append((name, key))
        return statistic

    def _check_lender_saw(self, name: str, index: int, x: torch.Tensor) -> None:
        """A borrowed statistic must have just folded in this very input (the lender's hooks run
        first, on the same forward); anything else would silently mix batches."""
        owner, owner_index = self._borrowed[index]
        if not same_tensor(x, owner._last_input.get(owner_index)):
            raise CalibrationError(
                f"the calibration statistic of {name} is shared between two modifiers, but the one "
                "that gathers it did not see this batch's input; calibrate them in separate stages",
                module=name,
            )

    def _after(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self._collects(self.group_of.get(name, -1)):
                return
            statistic = self.outputs.get(name)
            if statistic is not None:
                statistic.update(output, self.context.attention_mask)
            self._fired.add(name)
            if not self.discovering and len(self._fired) == self._collected_count() and self._may_stop():
                raise StopLayerForward

        return hook


def calibration_stages(layout: list[list[str]], true_sequential: bool, layer_name: str) -> list[set[int]]:
    """Which input groups are solved together, in order: all at once, or one group per stage.

    With ``true_sequential`` a layer with more than ``MAX_STAGES`` groups (a mixture of
    experts) is done in two stages, the first group and then all the others.
    """
    if not true_sequential:
        return [set(range(len(layout)))]
    if len(layout) > MAX_STAGES:
        logger.info(
            "%s has %d input groups (mixture of experts?): true_sequential solves the first "
            "group, then all the others from one more pass",
            layer_name, len(layout),
        )
        return [{0}, set(range(1, len(layout)))]
    return [{index} for index in range(len(layout))]


@attrs.frozen
class GroupSolver:
    """A modifier's solve of one input group, split so that ranks can share a layer's solves.

    ``compute(group)`` solves and returns the result without changing the model or the run
    state (it may read both); the result must pickle (tensors, numbers, attrs classes, dicts).
    ``apply(group, result)`` installs it (weights, scales, report rows, pending modules) and is
    called on every rank, in the groups' order. One process computes and applies each group in
    turn; under torchrun each group is computed by one rank (``llmc.distributed.solve_groups``).

    Optionally, groups that can be solved as one (the experts of an MoE block: the same shapes,
    each with its own statistic) are: ``batch_key(group)`` gives groups that may share a batch
    equal keys (None: solved alone), and ``compute_batch(groups)`` returns the result of each,
    in order, exactly what ``compute`` would return for it, in one batched solve.

    Optionally ``split`` (``llmc.distributed.RowSplit``) lets ranks share the rows of a group
    that alone outweighs a rank's share of the layer, after one rank has prepared it
    (``prepare_cost``: the factorisation of its statistic).
    """

    compute: Callable[[InputGroup], Any]
    apply: Callable[[InputGroup, Any], None]
    batch_key: Callable[[InputGroup], Hashable | None] | None = None
    compute_batch: Callable[[list[InputGroup]], list[Any]] | None = None
    split: RowSplit | None = None


def group_cost(group: InputGroup, modules: Mapping[str, torch.nn.Linear]) -> float:
    """What solving ``group`` costs, for sharing solves out: ``prepare_cost`` (the factorisation
    of its statistic, once) and rows · columns² per module for its sweep; rows · columns per
    module for a group without a statistic (rounding)."""
    cost = prepare_cost(group, modules)
    for name in group.names:
        rows, columns = modules[name].weight.shape
        cost += rows * columns * (columns if group.statistic is not None else 1)
    return cost


def prepare_cost(group: InputGroup, modules: Mapping[str, torch.nn.Linear]) -> float:
    """The part of ``group_cost`` done once for all of the group's rows: columns³, the
    factorisation of its statistic (nothing without one)."""
    if group.statistic is None or not group.names:
        return 0.0
    return float(modules[group.names[0]].weight.shape[1]) ** 3


@attrs.define
class LayerCalibration:
    """A modifier's calibration across layers: passes, stages and the layouts found.

    ``start`` (from ``llmc_layer_start``) hooks the layer's target modules for the pipeline's
    calibration pass; ``finish`` (from ``llmc_layer_end``) removes the hooks and calls
    ``solve(groups)`` for each stage's input groups, re-running the layer between stages when
    ``true_sequential`` is on (only the first stage is gathered in the pipeline's pass). The
    grouping found for a layer is reused by later layers with the same class and module names.
    """

    input_statistic: Callable[[torch.nn.Linear], Statistic]
    output_statistic: Callable[[torch.nn.Linear], Statistic | None] | None = None
    true_sequential: bool = False
    # (layer class, local module names) -> input groups of local names, in the order they run
    layouts: dict[tuple[str, tuple[str, ...]], list[list[str]]] = attrs.field(factory=dict)
    current: StatisticsPass | None = None
    _layout_key: tuple[str, tuple[str, ...]] | None = None
    _warned_few_tokens: bool = False

    def start(
        self,
        context: RunContext,
        layer_name: str,
        layer: torch.nn.Module,
        modules: Mapping[str, torch.nn.Linear],
    ) -> bool:
        """Hook ``modules`` (full names) of ``layer``; returns whether there is anything to do."""
        if not modules:
            return False
        prefix = f"{layer_name}."
        self._layout_key = (type(layer).__qualname__, tuple(n.removeprefix(prefix) for n in modules))
        known = self.layouts.get(self._layout_key)
        layout = None if known is None else [[prefix + local for local in group] for group in known]
        self.current = self._pass(
            layer, modules, context, layout, {0} if self.true_sequential else None, "if-alone"
        )
        return True

    def finish(
        self,
        context: RunContext,
        layer_name: str,
        layer: torch.nn.Module,
        solve: Callable[[list[InputGroup]], None] | GroupSolver,
    ) -> None:
        """Remove the hooks and solve the layer's input groups, stage by stage.

        ``solve`` is a ``GroupSolver`` (whose computes ranks share) or a function of a stage's
        groups (which every rank then runs on all of them, from the same reduced statistics).
        """
        if self.current is None:
            return
        first, self.current = self.current, None
        layout = first.remove()
        prefix = f"{layer_name}."
        assert self._layout_key is not None
        self.layouts[self._layout_key] = [[n.removeprefix(prefix) for n in group] for group in layout]
        stages = calibration_stages(layout, self.true_sequential, layer_name)
        self._check_tokens(first)
        self._solve(context, layer_name, first.modules, first.groups(stages[0]), solve)
        for stage in stages[1:]:
            if context.forward_layer is None:
                raise CalibrationError(
                    f"true_sequential needs to re-run {layer_name}, but the pipeline offers no "
                    "context.forward_layer; set true_sequential: false",
                    module=layer_name,
                )
            rerun = self._pass(layer, first.modules, context, layout, stage, "always")
            try:
                context.forward_layer()
            finally:
                rerun.remove()
            self._solve(context, layer_name, first.modules, rerun.groups(stage), solve)

    @staticmethod
    def _solve(
        context: RunContext,
        layer_name: str,
        modules: Mapping[str, torch.nn.Linear],
        groups: list[InputGroup],
        solve: Callable[[list[InputGroup]], None] | GroupSolver,
    ) -> None:
        if not isinstance(solve, GroupSolver):
            solve(groups)
            return
        costs = [group_cost(group, modules) for group in groups]
        solve_groups(
            groups, costs, solve.compute, solve.apply, context.device, f"solving {layer_name}",
            batch_key=solve.batch_key, compute_batch=solve.compute_batch, split=solve.split,
            prepare_costs=[prepare_cost(group, modules) for group in groups],
        )

    def _check_tokens(self, finished: StatisticsPass) -> None:
        """Warn once per run when a statistic saw fewer tokens than its input has columns.

        A Hessian of C columns from fewer than C tokens is singular: damping, not data, then
        decides the result (``max_seq_length: 1`` is accepted, but calibrates almost nothing).
        """
        if self._warned_few_tokens:
            return
        for group in finished.groups():
            module = finished.modules[group.names[0]]
            columns = getattr(module, "in_features", 0)
            if group.statistic is not None and group.statistic.tokens < columns:
                self._warned_few_tokens = True
                logger.warning(
                    "the calibration statistics of %s come from %d tokens, fewer than its %d "
                    "input columns, so they are singular and damping decides the result; "
                    "calibrate on more tokens (num_calibration_samples × max_seq_length)",
                    group.names[0], group.statistic.tokens, columns,
                )
                return

    def _pass(
        self,
        layer: torch.nn.Module,
        modules: Mapping[str, torch.nn.Linear],
        context: RunContext,
        layout: list[list[str]] | None,
        collect: set[int] | None,
        stop: str,
    ) -> StatisticsPass:
        return StatisticsPass(
            layer, modules, context,
            input_statistic=self.input_statistic, output_statistic=self.output_statistic,
            layout=layout, collect=collect, stop=stop,
        )
