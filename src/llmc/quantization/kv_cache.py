"""KV-cache quantization: the keys and values an attention module caches, seen without model code.

Every transformers attention hands its post-RoPE key and value states ``[batch, kv_heads,
seq, head_dim]`` to ``cache.update(key_states, value_states, layer_idx, ...)`` when it is given a
cache, and uses what ``update`` returns. A forward pre-hook on the attention module puts a
``KVCacheTap`` in place of that cache argument (wrapping the real cache, if any), so the states
pass through llmc on their way to the cache: observers see them during calibration, and once
``k_scale``/``v_scale`` are set they are fake-quantized, which is what vLLM's FP8 KV cache
stores. compressed-tensors 0.20 does the same with its ``QuantizedKVCache``; its loader finds
the attention modules by a ``past_key_values`` parameter that transformers 5.24 renamed to
``cache``, so here the module is recognised by any of the three names.

The scales are buffers of the attention module under compressed-tensors' names and shapes:
``k_scale`` and ``v_scale`` ``[1]`` (``tensor``) or ``[kv_heads, 1, 1]`` (``attn_head``), in the
dtype of the module's parameters; symmetric, so no zero point is stored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from llmc.errors import CalibrationError
from llmc.quantization.grids import grid_of
from llmc.quantization.math import static_activation_fake_quantize
from llmc.quantization.scheme import QuantizationArgs
from llmc.torch_hooks import has_forward_pre_hook

__all__ = [
    "KV_CACHE_ARGS",
    "KVCacheTap",
    "cache_argument",
    "cached_attention_modules",
    "kv_cache_args",
    "set_kv_observer",
    "set_kv_scales_",
    "tap_kv_cache_",
]

# The attribute holding an attention module's kv_cache_scheme (QuantizationArgs).
KV_CACHE_ARGS = "llmc_kv_cache_args"
# A callable (key_states, value_states) -> None set while the module is being calibrated.
_OBSERVE = "llmc_kv_observe"
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module``'s forward takes its KV cache, None when it takes none."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in _CACHE_NAMES if name in parameters), None)


def _is_cached_attention(module: nn.Module) -> bool:
    # compressed-tensors' rule (an "attention" class with a key/value projection), widened to
    # transformers 5.24's cache argument name
    return (
        "attention" in type(module).__name__.lower()
        and any(hasattr(module, name) for name in _PROJECTIONS)
        and cache_argument(module) is not None
    )


def cached_attention_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(full name, module)`` of every attention module under ``root`` that caches keys and values."""
    for name, module in root.named_modules():
        if _is_cached_attention(module):
            yield (f"{prefix}.{name}" if prefix and name else prefix or name), module


class KVCacheTap:
    """Stands in for an attention module's cache for one forward: observes, fake-quantizes,
    then hands the states to the real cache (if there is one) and returns what it returns."""

    def __init__(self, module: nn.Module, cache: Any) -> None:
        self._module = module
        self._cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        module = self._module
        observe = getattr(module, _OBSERVE, None)
        if observe is not None:
            observe(key_states, value_states)
        args_q = getattr(module, KV_CACHE_ARGS, None)
        k_scale = getattr(module, "k_scale", None)
        if args_q is not None and k_scale is not None:
            key_states = static_activation_fake_quantize(key_states, k_scale, None, args_q)
            value_states = static_activation_fake_quantize(value_states, module.v_scale, None, args_q)
        if self._cache is not None:
            return self._cache.update(key_states, value_states, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name: str) -> Any:
        # models that read the cache's structure (``cache.layers``) get the real cache's
        cache = self.__dict__.get("_cache")
        if cache is not None:
            return getattr(cache, name)
        raise AttributeError(name)


def _tap_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: the attention's cache argument becomes a ``KVCacheTap``."""
    name = cache_argument(module)
    cache = None
    for alias in _CACHE_NAMES:  # the caller may pass a deprecated spelling
        if alias in kwargs:
            given = kwargs.pop(alias)
            cache = given if given is not None else cache
    kwargs[name] = KVCacheTap(module, cache)
    return args, kwargs


def tap_kv_cache_(module: nn.Module, args: QuantizationArgs) -> None:
    """Route ``module``'s keys and values through llmc (at most one hook, ever)."""
    if cache_argument(module) is None:
        raise CalibrationError(
            f"{type(module).__name__} takes no cache argument ({', '.join(_CACHE_NAMES)}); its "
            "keys and values cannot be quantized",
        )
    setattr(module, KV_CACHE_ARGS, args)
    if not has_forward_pre_hook(module, _tap_hook):
        module.register_forward_pre_hook(_tap_hook, with_kwargs=True)


def set_kv_observer(module: nn.Module, observe: Callable[[torch.Tensor, torch.Tensor], None] | None) -> None:
    """Give ``module`` a callback for its key/value states (None to stop observing)."""
    if observe is None:
        if hasattr(module, _OBSERVE):
            delattr(module, _OBSERVE)
    else:
        setattr(module, _OBSERVE, observe)


def kv_cache_args(module: nn.Module) -> QuantizationArgs | None:
    """The kv_cache_scheme ``module`` was calibrated with, once its scales are set."""
    if getattr(module, "k_scale", None) is None:
        return None
    return getattr(module, KV_CACHE_ARGS, None)


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    parameter = next(module.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


@torch.no_grad()
def set_kv_scales_(module: nn.Module, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Install an attention module's ``k_scale``/``v_scale`` (checkpoint names, dtype of its
    parameters, as compressed-tensors creates them); from then on its K/V are fake-quantized."""
    args = getattr(module, KV_CACHE_ARGS, None)
    if args is None:
        raise CalibrationError("set_kv_scales_ needs a module tapped with tap_kv_cache_ first")
    grid_of(args)  # a format llmc can round to
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else k_scale.device
    dtype = _parameter_dtype(module)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        value = scale.detach().to(device=device, dtype=dtype)
        if name in module._buffers:
            module._buffers[name] = value
        else:
            module.register_buffer(name, value)
