"""``AWQModifier`` and ``SmoothQuantModifier``: their recipe parameters, validated on load.

Configuration only (frozen attrs classes); the run states that smooth (and, for an AWQ
modifier with its own scheme, quantize) are in ``llmc_awq.run``. Parameter names are
llm-compressor 0.14's, so its recipes load unchanged, including its layout::

    quant_stage:
      quant_modifiers:
        AWQModifier: {duo_scaling: true}                 # no scheme: smooths only ...
        QuantizationModifier: {scheme: W4A16_ASYM, targets: [Linear], ignore: [lm_head]}
                                                         # ... searching with this one's scheme
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from llmc.errors import ArgumentError, RecipeError
from llmc.modifier import Modifier
from llmc.modifiers.quantization import QuantizingModifier
from llmc.validators import as_list, is_number_in, is_target_list
from llmc_awq.mappings import mapping_specs
from llmc_awq.scales import DUO_SCALING

if TYPE_CHECKING:
    from llmc.context import RunContext
    from llmc_awq.run import AWQRun, SmoothQuantRun

__all__ = ["AWQModifier", "SmoothQuantModifier", "following_quantizer"]

_QUANTIZER_HINT = "put a QuantizationModifier or GPTQModifier after it in the same stage"


def _check_duo_scaling(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not any(value is option or (isinstance(value, str) and value == option) for option in DUO_SCALING):
        raise ArgumentError(f"'duo_scaling' must be true, false or 'both' (got {value!r})", name="duo_scaling")


def _check_n_grid(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ArgumentError(
            f"'n_grid' must be an integer of at least 2, the number of α values searched (got {value!r})",
            name="n_grid",
        )


def _check_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ArgumentError(
            f"'{attribute.name}' must be a device such as 'cpu' or 'cuda:0', or null (got {value!r})",
            name=attribute.name,
        ) from None


def _check_optional_positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ArgumentError(
            f"'{attribute.name}' must be a positive integer or null for no limit (got {value!r})",
            name=attribute.name,
        )


def _device_text(value: Any) -> str | None:
    return str(value) if isinstance(value, torch.device) else value


def _quantizers_around(modifier: Modifier, stage: Sequence[Modifier]) -> tuple[list[Modifier], list[Modifier]]:
    """The quantizing modifiers of ``stage`` before and after ``modifier`` (found by identity)."""
    index = next((i for i, m in enumerate(stage) if m is modifier), None)
    if index is None:
        return [], []
    before = [m for m in stage[:index] if isinstance(m, QuantizingModifier) and not isinstance(m, AWQModifier)]
    after = [m for m in stage[index + 1:] if isinstance(m, QuantizingModifier) and not isinstance(m, AWQModifier)]
    return before, after


def _refuse_quantizer_before(modifier: Modifier, stage: Sequence[Modifier]) -> None:
    before, after = _quantizers_around(modifier, stage)
    if before and not after:
        raise RecipeError(
            f"{modifier.recipe_name()} comes after {before[0].recipe_name()} in its stage; it must "
            "come before the quantizer, which then quantizes the smoothed weights"
        )


def following_quantizer(modifier: Modifier, stage: Sequence[Modifier]) -> QuantizingModifier | None:
    """The quantizer after ``modifier`` in its stage, whose scheme a scheme-less AWQ uses."""
    _, after = _quantizers_around(modifier, stage)
    return after[0] if after else None  # type: ignore[return-value]


@attrs.frozen(kw_only=True)
class AWQModifier(QuantizingModifier):
    """Activation-aware weight quantization (arXiv 2306.00978): before weights are rounded,
    scale up the input channels that carry large activations, folding the inverse into the
    norm or Linear that produces them, so the model computes the same function and the salient
    weights lose less to rounding.

    The scale exponent ``α`` is searched per mapping on ``n_grid`` points by the output error
    of the quantized group on a sample of at most ``max_search_tokens`` calibration tokens;
    ``duo_scaling`` (true, false or "both") divides by the weights' magnitude too.
    ``mappings`` (llm-compressor's ``smooth_layer``/``balance_layers``) override the mappings
    found from the model's data flow. Without ``scheme``/``config_groups`` the quantizer after
    it in the stage (``QuantizationModifier`` or ``GPTQModifier``) supplies the scheme,
    targets and ignore list and does the rounding; with them, it quantizes by itself.
    ``offload_device`` keeps the search sample there instead of on the layer's device.
    """

    mappings: Any = attrs.field(default=None, converter=mapping_specs)
    duo_scaling: Any = attrs.field(default=True, validator=_check_duo_scaling)
    n_grid: int = attrs.field(default=20, validator=_check_n_grid)
    offload_device: str | None = attrs.field(default=None, converter=_device_text, validator=_check_device)
    max_search_tokens: int | None = attrs.field(default=8192, validator=_check_optional_positive)

    def __attrs_post_init__(self) -> None:
        if self.has_scheme():
            self.schemes()  # validated now, as every quantizer's is
        elif self.kv_cache_scheme is not None:
            raise ArgumentError(
                "AWQModifier without a scheme takes no kv_cache_scheme; give it to the quantizer "
                "after it, which calibrates the KV cache",
                name="kv_cache_scheme",
            )
        self.kv_cache_args()
        if self.duo_scaling == "both" and self.n_grid < 4:
            raise ArgumentError(
                f"'n_grid' must be at least 4 with duo_scaling 'both' (half the points each way; got {self.n_grid})",
                name="n_grid",
            )

    def has_scheme(self) -> bool:
        return self.scheme is not None or self.config_groups is not None

    def check_stage(self, stage: Sequence[Modifier]) -> None:
        _refuse_quantizer_before(self, stage)
        quantizer = following_quantizer(self, stage)
        if self.has_scheme() and quantizer is not None:
            raise RecipeError(
                f"AWQModifier has its own scheme and is followed by {quantizer.recipe_name()}; give the "
                "scheme to one of them (without one, AWQModifier takes it from the quantizer after it)"
            )
        if not self.has_scheme() and quantizer is None:
            raise RecipeError(
                "AWQModifier has no scheme to search with: give it scheme (e.g. W4A16_ASYM) or "
                f"config_groups, or {_QUANTIZER_HINT}"
            )

    def start(self, context: RunContext) -> AWQRun:
        from llmc_awq.run import AWQRun

        quantizer = None if self.has_scheme() else following_quantizer(self, context.stage_modifiers)
        if not self.has_scheme() and quantizer is None:
            self.check_stage(context.stage_modifiers)  # raises, saying what is missing
        return AWQRun(config=self, quantizer=quantizer, activations=self.activation_calibration())


@attrs.frozen(kw_only=True)
class SmoothQuantModifier(Modifier):
    """SmoothQuant (arXiv 2211.10438): divide each activation channel by
    ``s = max|x|^α / max|w|^(1−α)`` and multiply the weights that read it by ``s``, so int8
    inputs quantized per token lose less to outlier channels before W8A8 (the quantizer after
    it in the stage does the rounding).

    ``smoothing_strength`` is ``α`` (0: nothing moves, 1: all of the range moves into the
    weights); ``mappings`` override the mappings found from the model's data flow; a mapping
    whose smooth layer and balance layers are all in ``ignore`` is left alone;
    ``num_calibration_steps`` limits the batches the activation ranges come from.
    """

    smoothing_strength: float = attrs.field(
        default=0.5, validator=is_number_in(0, 1, high_open=False, description="a number in [0, 1], e.g. 0.5")
    )
    mappings: Any = attrs.field(default=None, converter=mapping_specs)
    ignore: list[str] = attrs.field(factory=list, converter=as_list, validator=is_target_list)
    num_calibration_steps: int | None = attrs.field(default=None, validator=_check_optional_positive)

    def check_stage(self, stage: Sequence[Modifier]) -> None:
        _refuse_quantizer_before(self, stage)

    def start(self, context: RunContext) -> SmoothQuantRun:
        from llmc_awq.run import SmoothQuantRun

        return SmoothQuantRun(config=self)
