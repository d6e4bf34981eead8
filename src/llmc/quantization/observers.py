"""Observers: how the static scale of a weight, a Linear's input or the KV cache is estimated.

A static scale is fixed once, from what calibration saw; the observer named in the arguments
(``observer:``, ``observer_kwargs:``) decides how. The names and their meaning are
llm-compressor 0.14's (``llmcompressor/observers``), so a recipe written for it calibrates the
same way here:

- ``memoryless_minmax``: the min/max of the last tensor observed (a weight is observed once).
- ``static_minmax``: the min/max over every calibration token (the ``FP8`` preset's inputs).
- ``minmax``: a moving average of each batch's min/max, ``m ← (1 - c)·m + c·m_batch`` with
  ``averaging_constant`` ``c = 0.01``; the first batch sets ``m``. With few batches the range
  stays close to the first batch's, as in llm-compressor.
- ``memoryless_mse`` / ``mse``: per scale, search the shrink factors ``p = 1 - i/grid`` for
  ``i < maxshrink·grid`` (defaults ``grid = 100``, ``maxshrink = 0.2``: ``p`` from 1.0 to
  0.81) of the min-max range, keeping the ``p`` that minimises ``Σ |x̂ - x|^norm`` (``norm =
  2.4``), stopping after ``patience = 5`` steps without improvement; ``mse`` moves its range
  with ``averaging_constant`` as ``minmax`` does.

Every observer folds a tensor in with ``update`` and returns ``(scale, zero_point)`` from
``finalize``, through the same ``_qparams_from_range`` as round-to-nearest (compressed-tensors'
``calculate_qparams``). Before reducing, a tensor is viewed as ``[observations, *scale_shape,
elements]`` (llm-compressor's ``flatten_for_calibration``): ``weight`` ``[rows, cols]``,
``input`` ``[tokens, features]`` (padding already removed; NVFP4's ``dynamic: local`` inputs
observe the whole tensor, whose range gives their static global scale), ``kv`` ``[batch, heads, seq,
head_dim]`` (post-RoPE keys or values, per ``tensor`` or per ``attn_head``).

Observers implement ``llmc.statistics.Statistic`` (``tokens``, ``update``, ``merge``,
``finalize``), so the pipeline's input groups gather them like any other statistic.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from llmc.errors import ArgumentError, CalibrationError
from llmc.quantization.math import _codes_as_float, _from_codes, _qparams_from_range
from llmc.quantization.scheme import OBSERVER_KWARGS, QuantizationArgs

__all__ = [
    "OBSERVERS",
    "Observer",
    "make_observer",
    "observe_weight",
    "observed_view",
]

ROLES = ("weight", "input", "kv")


def _weight_view(W: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    if args.strategy == "tensor":
        return W.reshape(1, 1, -1)  # [1, 1, rows*cols]
    if args.strategy == "channel":
        return W.unsqueeze(-2).unsqueeze(0)  # [1, rows, 1, cols]
    if args.strategy == "group":
        return W.unflatten(-1, (-1, args.group_size)).unsqueeze(0)  # [1, rows, groups, size]
    raise ArgumentError(f"strategy {args.strategy!r} has no static weight scale", name="strategy")


def _input_view(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    # tensor_group (NVFP4): the observed range is the whole tensor's, for its global scale
    if args.strategy in ("tensor", "tensor_group"):
        return x.reshape(-1, 1, x.shape[-1])  # [tokens, 1, features]
    raise ArgumentError(
        f"static input activations support strategy 'tensor' (got {args.strategy!r})",
        name="strategy",
    )


def _kv_view(states: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    per_token = states.transpose(1, 2).flatten(0, 1)  # [batch*seq, heads, head_dim]
    if args.strategy == "tensor":
        return per_token.flatten(-2, -1).unsqueeze(-2)  # [batch*seq, 1, heads*head_dim]
    if args.strategy == "attn_head":
        return per_token.unsqueeze(-2).unsqueeze(-2)  # [batch*seq, heads, 1, 1, head_dim]
    raise ArgumentError(
        f"kv_cache_scheme supports strategies 'tensor', 'attn_head' (got {args.strategy!r})",
        name="strategy",
    )


_VIEWS = {"weight": _weight_view, "input": _input_view, "kv": _kv_view}


def observed_view(value: torch.Tensor, role: str, args: QuantizationArgs) -> torch.Tensor:
    """``value`` as ``[observations, *scale_shape, elements]`` for its role (module docstring)."""
    return _VIEWS[role](value, args)


def _range(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))


def _lerp(old: torch.Tensor, new: torch.Tensor, weight: float) -> torch.Tensor:
    # written out, as llm-compressor does: torch.lerp rounds differently in low precision
    return old * (1.0 - weight) + new * weight


def _elementwise_fake_quantize(
    observed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor:
    """Round ``observed`` onto the grids of ``scale``/``zero_point`` (one per ``[..., :]`` row)."""
    codes = _codes_as_float(observed, scale.unsqueeze(-1), zero_point.unsqueeze(-1), args)
    return _from_codes(codes, scale.unsqueeze(-1), zero_point.unsqueeze(-1)).to(observed.dtype)


@torch.no_grad()
def mse_range(
    observed: torch.Tensor,
    args: QuantizationArgs,
    *,
    maxshrink: float = 0.2,
    patience: int = 5,
    grid: float = 100.0,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk ``(lo, hi)`` per scale minimising ``Σ |x̂ - x|^norm`` (module docstring).

    ``observed: [observations, *scale_shape, elements]``; a scale keeps an earlier factor unless
    a later one is strictly better, and the search stops after ``patience`` steps in which no
    scale improved.
    """
    lo, hi = _range(observed)
    best_error = torch.full_like(lo, torch.finfo(lo.dtype).max)
    best_lo, best_hi = lo.clone(), hi.clone()
    stale = 0
    for step in range(int(maxshrink * grid)):
        shrink = 1 - step / grid
        lo_p, hi_p = lo * shrink, hi * shrink
        scale, zero_point = _qparams_from_range(lo_p, hi_p, args)
        scale, zero_point = scale.reshape(lo.shape), zero_point.reshape(lo.shape)
        error = (_elementwise_fake_quantize(observed, scale, zero_point, args) - observed)
        error = error.abs().pow(norm).sum(dim=(0, -1))  # [*scale_shape]
        better = error < best_error
        if bool(better.any()):
            best_error[better] = error[better]
            best_lo[better], best_hi[better] = lo_p[better], hi_p[better]
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_lo, best_hi


@attrs.define
class Observer:
    """The running range of one tensor (a weight, a Linear's input, keys or values).

    ``name`` is the observer's recipe name, ``kwargs`` its ``observer_kwargs``; ``dtype`` is
    the dtype the scale is stored in (the module's weight dtype, as compressed-tensors creates
    the parameter), None to keep the observed dtype.
    """

    name: str
    args: QuantizationArgs
    role: str
    dtype: torch.dtype | None = None
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    tokens: int = 0
    batches: int = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold in one tensor; ``mask`` is unused: callers pass only real tokens."""
        if x.numel() == 0:
            return
        observed = observed_view(x.detach(), self.role, self.args)
        if self.name in ("mse", "memoryless_mse"):
            search = {k: v for k, v in self.kwargs.items() if k != "averaging_constant"}
            lo, hi = mse_range(observed, self.args, **search)
        else:
            lo, hi = _range(observed)
        self._fold(lo, hi)
        self.tokens += observed.shape[0]
        self.batches += 1

    def _fold(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None or self.name in ("memoryless_minmax", "memoryless_mse"):
            self.lo, self.hi = lo, hi
        elif self.name == "static_minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:  # minmax, mse: moving average
            constant = self.kwargs.get("averaging_constant", 0.01)
            if constant != 1.0:
                lo, hi = _lerp(self.lo, lo, constant), _lerp(self.hi, hi, constant)
            self.lo, self.hi = lo, hi

    def merge(self, other: Observer) -> None:
        """Fold in the same tensor observed elsewhere: min/max for ``static_minmax``, the mean
        of the ranges weighted by batches for the others (llm-compressor's distributed
        reduction averages them; weighting makes merging ranks one by one give that mean)."""
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = other.lo.clone(), other.hi.clone()
        elif self.name == "static_minmax":
            self.lo, self.hi = torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi)
        else:
            mine, theirs = max(self.batches, 1), max(other.batches, 1)
            weight = theirs / (mine + theirs)
            self.lo, self.hi = _lerp(self.lo, other.lo, weight), _lerp(self.hi, other.hi, weight)
        self.tokens += other.tokens
        self.batches += other.batches

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the observed range, the scale in ``dtype``."""
        if self.lo is None:
            raise CalibrationError(
                f"the {self.name} observer of a {self.role} saw no calibration tokens; add "
                "calibration samples"
            )
        lo, hi = self.lo, self.hi
        if self.dtype is not None:
            lo, hi = lo.to(self.dtype), hi.to(self.dtype)
        return _qparams_from_range(lo, hi, self.args)


def _observer_name(args: QuantizationArgs, role: str) -> str:
    """The observer that runs: llm-compressor's defaults, and weights always memoryless (a
    weight is observed once, so the running observers would give the same range)."""
    name = args.observer or ("memoryless_minmax" if role == "weight" else "minmax")
    if role == "weight":
        return "memoryless_mse" if name in ("mse", "memoryless_mse") else "memoryless_minmax"
    return name


def make_observer(args: QuantizationArgs, role: str, dtype: torch.dtype | None = None) -> Observer:
    """A new observer for ``args`` (its ``observer`` and ``observer_kwargs``) in ``role``."""
    if role not in ROLES:
        raise ArgumentError(f"'role' must be one of {', '.join(ROLES)} (got {role!r})", name="role")
    if args.dynamic and not (role == "input" and args.has_global_scale):
        raise ArgumentError("dynamic arguments have no observer: their scales are computed at run time", name="dynamic")
    return Observer(_observer_name(args, role), args, role, dtype, dict(args.observer_kwargs))


@torch.no_grad()
def observe_weight(W: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of a weight ``W: [rows, cols]`` under its observer."""
    observer = make_observer(args, "weight", W.dtype)
    observer.update(W)
    return observer.finalize()


OBSERVERS = tuple(OBSERVER_KWARGS)

