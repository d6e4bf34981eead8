"""The run states of ``AWQModifier`` and ``SmoothQuantModifier``.

Per decoder layer, both smooth in ``llmc_layer_start``, before the quantizer after them in the
stage attaches its hooks, so the quantizer (GPTQ's Hessians included) sees the smoothed layer::

    mappings   found once per kind of layer (llmc_awq.discovery) or resolved from the recipe,
               checked to leave the layer's output unchanged when folded
    one pass   context.forward_layer(): per mapping, the activation statistic over every
               calibration token (AWQ: mean |x|, SmoothQuant: max |x|) and, for AWQ, a bounded
               sample of the parent module's inputs
    per mapping, in data-flow order
               AWQ: grid search of α (llmc_awq.search); SmoothQuant: s from eq. 4
               fold s into the producer and the balance layers (llmc_awq.folding)

An AWQ modifier with its own scheme then rounds the layer's targets in ``llmc_layer_end`` (and
whatever lies outside the layers in ``llmc_finalize``); without one the quantizer after it does.
Its static input and KV-cache scales (``llmc.calibration``) are observed in the pipeline's
calibration pass, which runs after the smoothing, on the smoothed layer.

Under torchrun the gathering pass runs on each rank's own batches and its statistics are
reduced across the ranks (``llmc.distributed.reduce_statistics``); the token budgets
(``max_search_tokens``, ``num_calibration_steps``) are shared out like the samples, so the
ranks together gather what one process would, and every rank folds the same scales.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import torch

from llmc.calibration import ActivationCalibration
from llmc.context import RunContext
from llmc.distributed import rank, reduce_statistics, shard_bounds, sum_counts, world_size
from llmc.errors import CalibrationError
from llmc.modifier import RunState
from llmc.modifiers.quantization import (
    QuantizingModifier,
    round_to_nearest_and_record,
)
from llmc.pipeline import StopLayerForward
from llmc.quantization import QuantizationScheme, take_global_scale
from llmc.statistics import Statistic
from llmc.targets import is_match
from llmc_awq.capture import AbsMax, MeanAbs, ParentSample
from llmc_awq.config import AWQModifier, SmoothQuantModifier
from llmc_awq.discovery import check_mappings, discover_mappings, trace_layer
from llmc_awq.folding import balance_, fold_into_producer_
from llmc_awq.mappings import Mapping, check_specs_match, resolve_specs
from llmc_awq.scales import smoothquant_scales
from llmc_awq.search import search_scales

__all__ = ["AWQRun", "SmoothQuantRun", "SmoothingRun"]

logger = logging.getLogger("llmc.awq")


@attrs.define
class SmoothingRun(RunState):
    """What AWQ and SmoothQuant share: a layer's mappings, the gathering pass, the folding."""

    # (layer class, module names) -> (mappings found there, the layer they were found in)
    layouts: dict[tuple[str, tuple[str, ...]], tuple[list[Mapping], str]] = attrs.field(factory=dict, kw_only=True)

    @property
    def modifier_name(self) -> str:
        return type(self.config).recipe_name()  # type: ignore[attr-defined]

    def mappings_for(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> list[Mapping]:
        """The layer's checked mappings (found for the first layer of each kind, then reused)."""
        key = (type(layer).__qualname__, tuple(name for name, _ in layer.named_modules()))
        if key in self.layouts:
            mappings, found_in = self.layouts[key]
            return [m.renamed(found_in, layer_name) for m in mappings]
        specs = self.config.mappings  # type: ignore[attr-defined]
        if specs is not None:
            trace = trace_layer(context, layer, layer_name)
            mappings, skipped = resolve_specs(layer, layer_name, specs)
            mappings, broken = check_mappings(context, layer, layer_name, mappings, trace)
            if broken:
                raise CalibrationError(f"{self.modifier_name} mapping at {layer_name}: {broken[0]}; fix or remove it")
        else:
            mappings, skipped, trace = discover_mappings(context, layer, layer_name)
            mappings, more = check_mappings(context, layer, layer_name, mappings, trace)
            skipped += more
        del trace
        prefix = f"{layer_name}."
        for mapping in mappings:
            logger.info(
                "%s mapping (layers like %s): %s -> %s", self.modifier_name, layer_name,
                mapping.smooth.removeprefix(prefix), _short(mapping.balance, prefix),
            )
        for reason in skipped:
            logger.info("%s leaves a group of %s unsmoothed: %s", self.modifier_name, layer_name, reason)
        self.layouts[key] = (mappings, layer_name)
        return mappings

    def gather(
        self,
        context: RunContext,
        layer: torch.nn.Module,
        layer_name: str,
        mappings: list[Mapping],
        statistic: Callable[[], Statistic],
        *,
        sample_tokens: int | None = None,
        sample_device: torch.device | None = None,
        samples: bool = False,
        max_batches: int | None = None,
    ) -> tuple[list[Statistic], dict[str, ParentSample]]:
        """One pass of the calibration batches: each mapping's statistic and parent samples."""
        if context.forward_layer is None:
            raise CalibrationError(f"{self.modifier_name} needs calibration data at {layer_name}")
        prefix = f"{layer_name}."
        statistics = [statistic() for _ in mappings]
        parents: dict[str, ParentSample] = {}
        handles = []
        batches = [0]

        def door(module: torch.nn.Module, args: tuple) -> None:
            batches[0] += 1
            if max_batches is not None and batches[0] > max_batches:
                raise StopLayerForward

        def updater(index: int) -> Callable[..., None]:
            def update(module: torch.nn.Module, args: tuple) -> None:
                if args and isinstance(args[0], torch.Tensor) and args[0].numel():
                    statistics[index].update(args[0], context.attention_mask)

            return update

        try:
            handles.append(layer.register_forward_pre_hook(door))
            for index, mapping in enumerate(mappings):
                module = _module(layer, prefix, mapping.statistic_of)
                handles.append(module.register_forward_pre_hook(updater(index)))
                if samples and mapping.parent not in parents:
                    sample = ParentSample(sample_tokens, sample_device)
                    parents[mapping.parent] = sample
                    handles.append(
                        _module(layer, prefix, mapping.parent).register_forward_pre_hook(
                            sample.hook(lambda: context.attention_mask), with_kwargs=True
                        )
                    )
            context.forward_layer()
        finally:
            for handle in handles:
                handle.remove()
        reduced = reduce_statistics(
            statistics, [statistic] * len(statistics), context.device, f"reducing the activations of {layer_name}"
        )
        return [part if part is not None else statistic() for part in reduced], parents

    def fold(self, layer: torch.nn.Module, layer_name: str, mapping: Mapping, scales: torch.Tensor) -> None:
        prefix = f"{layer_name}."
        fold_into_producer_(_module(layer, prefix, mapping.smooth), mapping.producer, scales)
        for name in mapping.balance:
            balance_(_module(layer, prefix, name), scales)


def _rank_budget(total: int | None) -> int | None:
    """This rank's share of a budget of tokens or batches (all of it in one process)."""
    if total is None or world_size() == 1:
        return total
    start, stop = shard_bounds(total, rank(), world_size())
    return stop - start


def _module(layer: torch.nn.Module, prefix: str, name: str) -> torch.nn.Module:
    return layer if name == prefix.rstrip(".") else layer.get_submodule(name.removeprefix(prefix))


def _short(names: tuple[str, ...], prefix: str) -> str:
    local = [n.removeprefix(prefix) for n in names]
    return ", ".join(local[:4]) + (f" and {len(local) - 4} more" if len(local) > 4 else "")


@attrs.define
class AWQRun(SmoothingRun):
    """Run state of an ``AWQModifier``: the Linears the search rounds (and, with its own scheme,
    those it quantizes itself), and the mappings found per kind of layer."""

    config: AWQModifier
    quantizer: QuantizingModifier | None = None
    targets: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)
    pending: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)
    activations: ActivationCalibration = attrs.field(factory=lambda: ActivationCalibration("AWQModifier"))
    # NVFP4 global scales shared by fused siblings (llmc.quantization.take_global_scale)
    global_scales: dict[str, torch.Tensor] = attrs.field(factory=dict)

    def llmc_initialize(self, context: RunContext) -> None:
        if self.config.mappings is not None:
            check_specs_match(context.model, self.config.mappings)
        source = self.quantizer if self.quantizer is not None else self.config
        self.targets = source.plan(context)
        if self.quantizer is None:
            self.pending = dict(self.targets)
        logger.info(
            "AWQModifier: searching scales for %d Linear modules with the scheme of %s",
            len(self.targets), "its own" if self.quantizer is None else self.quantizer.recipe_name(),
        )

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool:
        self._smooth_layer(context, layer_name, layer)
        prefix = f"{layer_name}."
        in_layer = {n: pair for n, pair in self.pending.items() if n.startswith(prefix)}
        return self.activations.start(context, layer_name, layer, in_layer)

    def _smooth_layer(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        prefix = f"{layer_name}."
        if not any(name.startswith(prefix) for name in self.targets):
            return None
        mappings = [
            m for m in self.mappings_for(context, layer_name, layer) if any(b in self.targets for b in m.balance)
        ]
        if not mappings:
            return None
        device = torch.device(self.config.offload_device) if self.config.offload_device else None
        statistics, samples = self.gather(
            context, layer, layer_name, mappings, MeanAbs,
            sample_tokens=_rank_budget(self.config.max_search_tokens), sample_device=device, samples=True,
        )
        last_use = {m.parent: index for index, m in enumerate(mappings)}
        for index, mapping in enumerate(mappings):
            self._smooth(context, layer, layer_name, mapping, statistics[index], samples[mapping.parent])
            if last_use[mapping.parent] == index:
                del samples[mapping.parent]  # its sample is needed no more
        return None

    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        self.activations.finish(context, layer_name)
        prefix = f"{layer_name}."
        for name in [n for n in self.pending if n.startswith(prefix)]:
            self._quantize(context, name)

    def llmc_finalize(self, context: RunContext) -> None:
        for name in list(self.pending):
            self._quantize(context, name)

    def _smooth(
        self,
        context: RunContext,
        layer: torch.nn.Module,
        layer_name: str,
        mapping: Mapping,
        statistic: MeanAbs,
        sample: ParentSample,
    ) -> None:
        x_mean = statistic.finalize()  # reduced: the same on every rank
        # summed over the ranks, so all of them search or none does (a rank without calls still takes part)
        calls, search_tokens = sum_counts(torch.tensor([len(sample.calls), sample.tokens]), "counting the AWQ search sample").tolist()
        if x_mean is None or not calls:
            logger.info("AWQModifier: no calibration tokens reached %s; left unsmoothed", _short(mapping.balance, ""))
            return
        quantized = {n: self.targets[n] for n in mapping.balance if n in self.targets}
        parent = _module(layer, f"{layer_name}.", mapping.parent)
        result = search_scales(
            parent, sample, x_mean, quantized, n_grid=self.config.n_grid, duo_scaling=self.config.duo_scaling,
            compute_dtype=context.compute_dtype,
        )
        self.fold(layer, layer_name, mapping, result.scales)
        context.record(
            modifier="AWQModifier",
            module=mapping.smooth,
            balance=list(mapping.balance),
            parent=mapping.parent,
            alpha=round(result.alpha, 4),
            duo_scaling=result.duo,
            output_error=result.best_error,
            rtn_output_error=result.identity_error,
            tokens=statistic.tokens,
            search_tokens=search_tokens,
            search_bytes=result.held_bytes,
        )

    def _quantize(self, context: RunContext, name: str) -> None:
        global_scale = take_global_scale(self.global_scales, self.pending, name)
        module, scheme = self.pending.pop(name)
        round_to_nearest_and_record(
            context, "AWQModifier", name, module, scheme,
            global_scale=global_scale, activations=self.activations,
        )


@attrs.define
class SmoothQuantRun(SmoothingRun):
    """Run state of a ``SmoothQuantModifier``: the mappings found per kind of layer."""

    config: SmoothQuantModifier

    def llmc_initialize(self, context: RunContext) -> None:
        if self.config.mappings is not None:
            check_specs_match(context.model, self.config.mappings)

    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        modules = dict(layer.named_modules(prefix=layer_name))
        ignore = self.config.ignore
        mappings = [
            m for m in self.mappings_for(context, layer_name, layer)
            if not all(is_match(n, modules[n], ignore) for n in (m.smooth, *m.balance))
        ]
        if not mappings:
            return None
        statistics, _ = self.gather(
            context, layer, layer_name, mappings, AbsMax, max_batches=_rank_budget(self.config.num_calibration_steps)
        )
        for mapping, statistic in zip(mappings, statistics):
            act_absmax = statistic.finalize()
            if act_absmax is None:
                continue
            weight_absmax = torch.stack(
                [modules[n].weight.detach().abs().amax(dim=0).float() for n in mapping.balance]
            ).amax(dim=0)  # [cols]
            scales = smoothquant_scales(act_absmax, weight_absmax.to(act_absmax.device), self.config.smoothing_strength)
            self.fold(layer, layer_name, mapping, scales)
            context.record(
                modifier="SmoothQuantModifier",
                module=mapping.smooth,
                balance=list(mapping.balance),
                smoothing_strength=self.config.smoothing_strength,
                activation_max_before=float(act_absmax.max()),
                activation_max_after=float((act_absmax / scales.to(act_absmax.device)).max()),
                tokens=statistic.tokens,
            )
        return None
