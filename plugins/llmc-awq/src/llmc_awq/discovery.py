"""Finding a layer's mappings from its data flow, with forward hooks: no table of architectures.

Run once per kind of layer (layer class and module names), on the first calibration batch::

    trace      hooks on every module record the inputs of the modules with a 2-D weight
               (Linears, MoE routers) and the outputs of the normalisations
    groups     modules whose inputs hold the same values read one activation: q/k/v; gate/up
               (with the router and every expert of an MoE block); o; down
    producers  a group whose input *is* a normalisation's output (the same values, or a subset
               of its rows for routed experts) is smoothed into that norm; otherwise each
               earlier Linear is probed: its output channels (all, or a slice of a fused
               qkv/gate_up output) are multiplied by random positive scales, and when the
               group's input comes out multiplied by exactly those scales the path between is
               channel-wise linear (v → attention → o, up → act(gate)·up → down) and the
               Linear is the producer. A group with neither (o_proj under grouped-query
               attention, a Linear fed by a residual add) is skipped, with the reason logged
    fold check every mapping is folded with random scales and the layer's output compared with
               the original: a mapping that changes it (its producer's output also reaches a
               module that is not balanced) is dropped, with the reason

Norms are folded as ``n(x) ⊙ (w + c)``; ``c`` (0, or 1 for Gemma's ``1 + w``) is measured by
calling the norm with its weight zeroed, not read from its class name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.pipeline import StopLayerForward
from llmc_awq.capture import computing_in
from llmc_awq.folding import Producer, balance_, fold_into_producer_
from llmc_awq.mappings import Mapping, parent_of

__all__ = ["Trace", "check_mappings", "discover_mappings", "first_batch_forward", "trace_layer"]

logger = logging.getLogger("llmc.awq")


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _tolerance(context: RunContext, layer: torch.nn.Module) -> float:
    dtype = context.compute_dtype or next(layer.parameters()).dtype
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> bool:
    got, want = got.double(), want.double()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return False
    return float(torch.linalg.vector_norm(got - want)) <= tolerance * float(torch.linalg.vector_norm(want)) + 1e-12


@contextlib.contextmanager
def _hooked(hooks: Sequence[tuple[torch.nn.Module, str, Callable[..., Any]]]) -> Iterator[None]:
    handles = []
    try:
        for module, kind, hook in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def first_batch_forward(
    context: RunContext,
    layer: torch.nn.Module,
    hooks: Sequence[tuple[torch.nn.Module, str, Callable[..., Any]]] = (),
) -> torch.Tensor:
    """The layer's output on the first calibration batch, with ``hooks`` in place.

    Runs through ``context.forward_layer`` (so an MoE block calibrates its experts as the
    pipeline does) and stops every later batch at the layer's door.
    """
    if context.forward_layer is None:
        raise CalibrationError("finding AWQ/SmoothQuant mappings needs the pipeline's context.forward_layer")
    batches = [0]
    result: list[torch.Tensor] = []

    def door(module: torch.nn.Module, args: tuple) -> None:
        batches[0] += 1
        if batches[0] > 1:
            raise StopLayerForward

    def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None and not result:
            result.append(tensor.detach().clone())

    with _hooked([(layer, "pre", door), *hooks, (layer, "post", keep)]):
        context.forward_layer()
    if not result:
        raise CalibrationError("the first calibration batch did not reach the layer's output")
    return result[0]


@attrs.define
class Trace:
    """What one forward of the first batch showed: who ran when, who read and wrote what."""

    order: dict[str, int]  # module -> position of its first forward
    inputs: dict[str, torch.Tensor]  # weighted modules and norms: first input (as called)
    outputs: dict[str, torch.Tensor]  # norms: their output
    output: torch.Tensor  # the layer's output


def _weighted(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 2


def _norm_like(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 1 and not isinstance(module, torch.nn.Linear)


def trace_layer(context: RunContext, layer: torch.nn.Module, layer_name: str) -> Trace:
    order: dict[str, int] = {}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks: list[tuple[torch.nn.Module, str, Callable[..., Any]]] = []
    for local, module in layer.named_modules():
        if not local:
            continue
        name = f"{layer_name}.{local}"

        def before(module: torch.nn.Module, args: tuple, name: str = name) -> None:
            order.setdefault(name, len(order))
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and name not in inputs:
                if _weighted(module) or _norm_like(module):
                    inputs[name] = x.detach()

        def after(module: torch.nn.Module, args: tuple, output: Any, name: str = name) -> None:
            y = _first_tensor(output)
            if y is not None and name not in outputs:
                outputs[name] = y.detach()

        hooks.append((module, "pre", before))
        if _norm_like(module):
            hooks.append((module, "post", after))
    output = first_batch_forward(context, layer, hooks)
    return Trace(order, inputs, outputs, output)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _rows_within(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether every row of ``x: [n, d]`` is a row of ``y: [m, d]`` (routed experts' tokens)."""
    if x.shape[-1] != y.shape[-1] or x.shape[0] > y.shape[0]:
        return False
    if x.shape == y.shape and torch.equal(x, y):
        return True
    probe = torch.randn(x.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(x.device)
    hx, hy = x.double() @ probe, y.double() @ probe  # one number per row
    sorted_hy, order = torch.sort(hy)
    where = torch.searchsorted(sorted_hy, hx).clamp(max=len(hy) - 1)
    return torch.equal(y[order[where]], x)


def _groups(trace: Trace, layer: torch.nn.Module, layer_name: str) -> list[list[str]]:
    """Weighted modules that read the same values, in the order the layer first runs them."""
    prefix = f"{layer_name}."
    groups: list[list[str]] = []
    # a cheap fingerprint first (an MoE block has hundreds of expert inputs), then exact equality
    leaders: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for name in sorted(trace.inputs, key=trace.order.__getitem__):
        if not _weighted(layer.get_submodule(name.removeprefix(prefix))):
            continue
        x = _flat(trace.inputs[name])
        key = (tuple(x.shape), float(x[0].double().sum()), float(x[-1].double().sum()))
        for index, leader in leaders.get(key, []):
            if leader.data_ptr() == x.data_ptr() or torch.equal(leader, x):
                groups[index].append(name)
                break
        else:
            leaders.setdefault(key, []).append((len(groups), x))
            groups.append([name])
    return groups


def _role(local_name: str) -> str:
    """``mlp.experts.3.up_proj`` → ``mlp.experts.*.up_proj``: modules in the same place of
    same-kind siblings are probed together (each with its own scales)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", local_name)


def _probe_linear_producers(
    context: RunContext,
    layer: torch.nn.Module,
    layer_name: str,
    trace: Trace,
    pending: list[list[str]],
    tolerance: float,
) -> dict[int, tuple[str, int]]:
    """For pending groups (by index), the Linear and row offset whose output they scale with."""
    prefix = f"{layer_name}."
    found: dict[int, tuple[str, int]] = {}
    linears = {
        name: module for local, module in layer.named_modules()
        if local and isinstance(module, torch.nn.Linear) and (name := prefix + local) in trace.order
    }
    # (role, offset, width) -> [(linear name, group index)]
    probes: dict[tuple[str, int, int], list[tuple[str, int]]] = {}
    for index, group in enumerate(pending):
        width = _flat(trace.inputs[group[0]]).shape[-1]
        starts = min(trace.order[n] for n in group)
        for name, module in linears.items():
            if name in group or trace.order[name] >= starts or module.out_features % width:
                continue
            for offset in range(0, module.out_features, width):
                probes.setdefault((_role(name.removeprefix(prefix)), offset, width), []).append((name, index))
    generator = torch.Generator().manual_seed(0)
    for (_, offset, width), members in probes.items():
        open_members = [(n, i) for n, i in members if i not in found]
        if not open_members:
            continue
        scales: dict[str, torch.Tensor] = {}
        hooks: list[tuple[torch.nn.Module, str, Callable[..., Any]]] = []
        for name in dict.fromkeys(n for n, _ in open_members):
            s = torch.rand(width, generator=generator) * 1.5 + 0.5
            scales[name] = s

            def scale(
                module: torch.nn.Module, args: tuple, output: Any,
                s: torch.Tensor = s, rows: slice = slice(offset, offset + width),
            ) -> Any:
                y = output.clone()
                y[..., rows] *= s.to(device=y.device, dtype=y.dtype)
                return y

            hooks.append((linears[name], "post", scale))
        seen: dict[int, torch.Tensor] = {}
        for index in dict.fromkeys(i for _, i in open_members):
            leader = pending[index][0]

            def record(
                module: torch.nn.Module, args: tuple, index: int = index, seen: dict = seen
            ) -> None:
                if args and index not in seen:
                    seen[index] = args[0].detach().clone()

            hooks.append((layer.get_submodule(leader.removeprefix(prefix)), "pre", record))
        first_batch_forward(context, layer, hooks)
        for name, index in open_members:
            if index in found or index not in seen:
                continue
            x0 = _flat(trace.inputs[pending[index][0]]).double()
            x1 = _flat(seen[index]).double()
            if x1.shape == x0.shape and _close(x1, x0 * scales[name].double().to(x0.device), tolerance):
                found[index] = (name, offset)
    return found


@torch.no_grad()
def _norm_offset(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tolerance: float) -> float | None:
    """``c`` such that ``module(x) = n(x) ⊙ (w + c)``, or None when its output is no such thing.

    With the weight (and bias) zeroed the output is ``n·c``, with the weight at one
    ``n·(1 + c)``; their difference is ``n``. Folding with ``c`` is then checked on ``x``.
    """
    weight = module.weight
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, torch.Tensor)
    saved_weight = weight.detach().clone()
    saved_bias = bias.detach().clone() if has_bias else None
    try:
        weight.zero_()
        if has_bias:
            bias.zero_()
        y0 = module(x).double()
        weight.fill_(1.0)
        n = module(x).double() - y0
        usable = n.abs() > 1e-3 * n.abs().max()
        c = float((y0[usable] / n[usable]).median()) if bool(usable.any()) else 0.0
        c = float(round(c)) if abs(c - round(c)) < 1e-3 else c
        w = saved_weight.double()
        s = torch.linspace(0.5, 2.0, w.numel(), dtype=torch.float64, device=w.device)
        weight.copy_(((w + c) / s - c).to(weight.dtype))
        if has_bias:
            bias.copy_((saved_bias.double() / s).to(bias.dtype))
        return c if _close(module(x).double(), y.double() / s, tolerance) else None
    finally:
        weight.copy_(saved_weight)
        if has_bias:
            bias.copy_(saved_bias)


def discover_mappings(
    context: RunContext, layer: torch.nn.Module, layer_name: str
) -> tuple[list[Mapping], list[str], Trace]:
    """The layer's mappings found from its data flow, the groups left out (with why), the trace."""
    prefix = f"{layer_name}."
    tolerance = _tolerance(context, layer)
    trace = trace_layer(context, layer, layer_name)
    groups = _groups(trace, layer, layer_name)
    norms = [n for n in trace.outputs if n in trace.order]
    producers: dict[int, tuple[str, Producer]] = {}
    skipped: list[str] = []
    for index, group in enumerate(groups):
        x = _flat(trace.inputs[group[0]])
        starts = min(trace.order[n] for n in group)
        for norm in sorted(norms, key=trace.order.__getitem__, reverse=True):  # nearest first
            if trace.order[norm] < starts and _rows_within(x, _flat(trace.outputs[norm])):
                producers[index] = (norm, Producer("norm"))
                break
    pending = [g for i, g in enumerate(groups) if i not in producers]
    probed = _probe_linear_producers(context, layer, layer_name, trace, pending, tolerance)
    pending_index = [i for i in range(len(groups)) if i not in producers]
    for position, (name, offset) in probed.items():
        producers[pending_index[position]] = (name, Producer("linear", offset=offset))
    mappings = []
    for index, group in enumerate(groups):
        if index not in producers:
            skipped.append(
                f"{', '.join(n.removeprefix(prefix) for n in group[:4])}{' ...' if len(group) > 4 else ''}: "
                "its input is neither a normalisation's output nor a channel-wise image of an "
                "earlier Linear's output (a residual add, or o_proj under grouped-query attention)"
            )
            continue
        smooth, producer = producers[index]
        mappings.append(Mapping(smooth, producer, tuple(group), parent_of(layer, layer_name, group), group[0]))
    return mappings, skipped, trace


def _with_norm_offsets(
    layer: torch.nn.Module,
    layer_name: str,
    mappings: list[Mapping],
    trace: Trace,
    tolerance: float,
    compute_dtype: torch.dtype | None,
) -> tuple[list[Mapping], list[str]]:
    prefix = f"{layer_name}."
    kept, skipped = [], []
    for mapping in mappings:
        if mapping.producer.kind != "norm":
            kept.append(mapping)
            continue
        module = layer.get_submodule(mapping.smooth.removeprefix(prefix))
        x, y = trace.inputs.get(mapping.smooth), trace.outputs.get(mapping.smooth)
        c = None
        if x is not None and y is not None:
            with computing_in(compute_dtype, x.device):
                c = _norm_offset(module, x, y, tolerance)
        if c is None:
            skipped.append(f"{mapping.smooth.removeprefix(prefix)}: its output is not n(x) ⊙ (weight + c), so scales cannot be folded into it")
            continue
        kept.append(attrs.evolve(mapping, producer=Producer("norm", weight_offset=c)))
    return kept, skipped


@torch.no_grad()
def _fold_changes_output(
    context: RunContext, layer: torch.nn.Module, layer_name: str, mappings: list[Mapping], trace: Trace, tolerance: float
) -> bool:
    prefix = f"{layer_name}."
    names = {m.smooth for m in mappings} | {b for m in mappings for b in m.balance}
    modules = [layer.get_submodule(n.removeprefix(prefix)) for n in names]
    saved = {id(p): (p, p.detach().clone()) for module in modules for p in module.parameters(recurse=False)}
    generator = torch.Generator().manual_seed(1)
    try:
        for mapping in mappings:
            width = layer.get_submodule(mapping.balance[0].removeprefix(prefix)).weight.shape[1]
            s = torch.rand(width, generator=generator) * 1.5 + 0.5
            fold_into_producer_(layer.get_submodule(mapping.smooth.removeprefix(prefix)), mapping.producer, s)
            for name in mapping.balance:
                balance_(layer.get_submodule(name.removeprefix(prefix)), s)
        output = first_batch_forward(context, layer)
        return not _close(output, trace.output, tolerance)
    finally:
        for parameter, value in saved.values():
            parameter.data.copy_(value)


def check_mappings(
    context: RunContext, layer: torch.nn.Module, layer_name: str, mappings: list[Mapping], trace: Trace
) -> tuple[list[Mapping], list[str]]:
    """``mappings`` whose folding leaves the layer's output unchanged; a reason for each other."""
    tolerance = _tolerance(context, layer)
    mappings, skipped = _with_norm_offsets(layer, layer_name, mappings, trace, tolerance, context.compute_dtype)
    if not mappings or not _fold_changes_output(context, layer, layer_name, mappings, trace, tolerance):
        return mappings, skipped
    kept = []
    for mapping in mappings:
        if _fold_changes_output(context, layer, layer_name, [mapping], trace, tolerance):
            skipped.append(
                f"{mapping.smooth.removeprefix(layer_name + '.')}: folding scales into it changes the layer's "
                "output (its output also reaches a module that is not among the balance layers)"
            )
        else:
            kept.append(mapping)
    return kept, skipped
