"""Static activation scales from calibration data: Linear inputs and the KV cache.

A scheme with static input activations (the ``FP8`` preset), NVFP4's static input global
scale (``dynamic: local``: the per-group scales are computed at run time under it) or a
``kv_cache_scheme`` fixes its activation scales from what calibration shows each module, layer by layer, in the
pipeline's calibration pass: the same pass in which GPTQ gathers its Hessians, so an input
scale is observed on the inputs the layer actually receives (the outputs of the already
compressed layers before it) before anything in the layer is compressed, as in llm-compressor.

- Linear inputs go through ``llmc.statistics.StatisticsPass``: Linears that read the same
  tensor (q/k/v) share one set of observers, padding is left out (``real_tokens``).
- Keys and values are tapped on their way into the cache (``llmc.quantization.kv_cache``),
  after RoPE, padding left out too.

A quantizing modifier's run state owns one ``ActivationCalibration``: ``start`` from
``llmc_layer_start``, ``finish`` from ``llmc_layer_end`` (which sets the KV scales), and
``install_input_scale`` for each module once its weights are quantized, whose result goes into
the module's report row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.quantization.kv_cache import (
    cached_attention_modules,
    set_kv_observer,
    set_kv_scales_,
    tap_kv_cache_,
)
from llmc.quantization.module import (
    has_static_inputs,
    input_global_scale_from_range,
    set_input_global_scale_,
    set_input_qparams_,
)
from llmc.quantization.observers import Observer, make_observer
from llmc.quantization.scheme import QuantizationArgs, QuantizationScheme
from llmc.statistics import StatisticsPass, real_tokens

__all__ = ["ActivationCalibration", "InputObservers", "needs_calibration_data"]


def needs_calibration_data(schemes: list[QuantizationScheme], kv_cache: QuantizationArgs | None) -> bool:
    """Whether these schemes fix a scale from data (static inputs, a KV-cache scheme)."""
    return kv_cache is not None or any(has_static_inputs(scheme) for scheme in schemes)


@attrs.define
class InputObservers:
    """The observers of one input tensor, one per distinct (arguments, scale dtype) among the
    Linears that read it (an ``llmc.statistics.Statistic``)."""

    observers: dict[tuple[QuantizationArgs, torch.dtype], Observer]
    tokens: int = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        tokens = real_tokens(x, mask)  # [tokens, features]
        for observer in self.observers.values():
            observer.update(tokens)
        self.tokens += tokens.shape[0]

    def merge(self, other: InputObservers) -> None:
        for key, observer in other.observers.items():
            self.observers[key].merge(observer)
        self.tokens += other.tokens

    def finalize(self) -> dict[tuple[QuantizationArgs, torch.dtype], Observer]:
        return self.observers


def _kv_view_of_real_tokens(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``states: [batch, heads, seq, head_dim]`` without padded positions (as one batch row)."""
    if mask is None or mask.shape != (states.shape[0], states.shape[2]) or bool(mask.all()):
        return states
    per_token = states.transpose(1, 2)[mask.to(device=states.device, dtype=torch.bool)]  # [tokens, heads, dim]
    return per_token.transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, dim]


@attrs.define
class ActivationCalibration:
    """One quantizing modifier's static activation calibration across layers (module docstring)."""

    modifier: str
    kv_cache: QuantizationArgs | None = None
    current: StatisticsPass | None = None
    observed: dict[str, Observer] = attrs.field(factory=dict)  # module -> its input observer
    kv_observers: dict[str, tuple[Observer, Observer, torch.nn.Module]] = attrs.field(factory=dict)
    static: dict[str, tuple[torch.nn.Linear, QuantizationScheme]] = attrs.field(factory=dict)

    def start(
        self,
        context: RunContext,
        layer_name: str,
        layer: torch.nn.Module,
        modules: Mapping[str, tuple[torch.nn.Linear, QuantizationScheme]],
    ) -> bool:
        """Hook ``modules`` (full names) with static inputs, and the layer's attention modules
        when there is a KV-cache scheme; returns whether the calibration pass is needed."""
        static = {name: pair for name, pair in modules.items() if has_static_inputs(pair[1])}
        if static:
            keys = {
                (scheme.input_activations, module.weight.dtype) for module, scheme in static.values()
            }

            def observers_for(_: torch.nn.Linear) -> InputObservers:
                return InputObservers({key: make_observer(key[0], "input", key[1]) for key in keys})

            self.current = StatisticsPass(
                layer, {name: module for name, (module, _) in static.items()}, context,
                input_statistic=observers_for, stop="if-alone",
            )
            self.static = {name: (module, scheme) for name, (module, scheme) in static.items()}
        if self.kv_cache is not None:
            for name, attention in cached_attention_modules(layer, layer_name):
                self._tap(context, name, attention)
        return bool(static) or bool(self.kv_observers)

    def _tap(self, context: RunContext, name: str, attention: torch.nn.Module) -> None:
        args = self.kv_cache
        dtype = next(attention.parameters()).dtype
        k_observer, v_observer = make_observer(args, "kv", dtype), make_observer(args, "kv", dtype)
        tap_kv_cache_(attention, args)

        def observe(key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            mask = context.attention_mask
            k_observer.update(_kv_view_of_real_tokens(key_states.detach(), mask))
            v_observer.update(_kv_view_of_real_tokens(value_states.detach(), mask))

        set_kv_observer(attention, observe)
        self.kv_observers[name] = (k_observer, v_observer, attention)

    def finish(self, context: RunContext, layer_name: str) -> None:
        """Remove the hooks; keep each module's input observer; set and report KV scales."""
        if self.current is not None:
            finished, self.current = self.current, None
            finished.remove()
            for group in finished.groups():
                for name in group.names:
                    module, scheme = self.static[name]
                    if group.statistic is None:
                        raise CalibrationError(
                            f"{name} received no calibration tokens, so its static input scale "
                            "cannot be observed; add calibration samples or ignore the module",
                            module=name,
                        )
                    key = (scheme.input_activations, module.weight.dtype)
                    self.observed[name] = group.statistic.finalize()[key]
            self.static = {}
        for name, (k_observer, v_observer, attention) in self.kv_observers.items():
            set_kv_observer(attention, None)
            k_scale, _ = k_observer.finalize()
            v_scale, _ = v_observer.finalize()
            set_kv_scales_(attention, k_scale, v_scale)
            context.record(
                modifier=self.modifier, module=name, kv_cache=f"{k_observer.name} {self.kv_cache.strategy}",
                k_scale=_summary(attention.k_scale), v_scale=_summary(attention.v_scale),
                tokens=k_observer.tokens,
            )
        self.kv_observers.clear()

    def install_input_scale(self, name: str, module: torch.nn.Linear, scheme: QuantizationScheme) -> dict[str, Any]:
        """Set ``module``'s observed input scale; the values for its report row (none when its
        inputs are not static)."""
        observer = self.observed.pop(name, None)
        if observer is None:
            if has_static_inputs(scheme):
                raise CalibrationError(
                    f"{name} has static input activations but was not calibrated (it lies "
                    "outside the calibrated layers?); ignore it or use dynamic inputs",
                    module=name,
                )
            return {}
        facts = {"input_observer": observer.name, "input_tokens": observer.tokens}
        if scheme.input_activations.has_global_scale:  # NVFP4: per-group scales at run time
            set_input_global_scale_(module, input_global_scale_from_range(observer.lo, observer.hi))
            return {"input_global_scale": _summary(module.input_global_scale), **facts}
        scale, zero_point = observer.finalize()
        set_input_qparams_(module, scheme, scale, zero_point)
        return {"input_scale": _summary(module.input_scale), **facts}


def _summary(scale: torch.Tensor) -> float:
    """A scale as one number for the report: itself, or the largest of a per-head scale."""
    return float(scale.detach().float().max())
