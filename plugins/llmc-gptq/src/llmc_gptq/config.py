"""``GPTQModifier``: the recipe parameters of GPTQ, validated when the recipe loads.

Configuration only (a frozen attrs class); the run state that calibrates and quantizes is
``llmc_gptq.run.GPTQRun``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from llmc.errors import ArgumentError
from llmc.modifiers.quantization import QuantizingModifier
from llmc.quantization import QuantizationScheme
from llmc.validators import is_bool, is_number_in, is_positive_int

if TYPE_CHECKING:
    from llmc.context import RunContext
    from llmc_gptq.run import GPTQRun

__all__ = ["ACTORDERS", "GPTQModifier"]

ACTORDERS = (None, "weight", "static")
_NO_ACTORDER = ("none", "false")


def _canonical_actorder(value: Any) -> Any:
    if value is False or (isinstance(value, str) and value.lower() in _NO_ACTORDER):
        return None
    return value.lower() if isinstance(value, str) else value


def _check_actorder(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value in ("group", "dynamic"):
        raise ArgumentError(
            f"'actorder' {value!r} is not supported: it needs a g_idx tensor that "
            "compressed-tensors 0.20 no longer loads; use actorder 'weight' (or its alias "
            "'static'): same accuracy gain, no runtime cost",
            name="actorder",
        )
    if value not in ACTORDERS:
        raise ArgumentError(
            f"'actorder' must be one of null, 'weight', 'static' (got {value!r})", name="actorder"
        )


@attrs.frozen(kw_only=True)
class GPTQModifier(QuantizingModifier):
    """GPTQ weight quantization (arXiv 2210.17323): per Linear, round columns one at a time and
    let the remaining columns compensate, using second-order statistics of the layer's inputs.

    ``scheme`` (``W4A16``, ``W4A16_ASYM``, ``W8A16``, ``W8A8``, or ``{preset: [targets]}``)
    or ``config_groups`` say what to quantize; ``targets``/``ignore`` take class names, module
    names and ``re:`` patterns. ``block_size`` columns are updated lazily at a time;
    ``dampening_frac`` of the mean Hessian diagonal is added to it (raised step by step when
    the Hessian is still not positive definite). ``actorder`` ``weight`` (alias ``static``)
    quantizes columns by decreasing input energy while keeping the groups by column index, so
    the checkpoint needs no ``g_idx``; ``null`` keeps column order. ``true_sequential``
    quantizes the groups of a layer in data-flow order (q/k/v, o, gate/up, down), re-running
    the layer in between so each group is calibrated on the outputs of the already-quantized
    ones.
    """

    block_size: int = attrs.field(default=128, validator=is_positive_int)
    dampening_frac: float = attrs.field(
        default=0.01,
        validator=is_number_in(0, 1, low_open=True, description="a number between 0 and 1, e.g. 0.01"),
    )
    actorder: str | None = attrs.field(
        default="static", converter=_canonical_actorder, validator=_check_actorder
    )
    true_sequential: bool = attrs.field(default=False, validator=is_bool)

    def schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies (first match wins), with ``actorder`` resolved.

        The modifier's ``actorder`` fills in schemes that do not set one; a scheme from
        ``config_groups`` that sets its own keeps it (the only value left, ``weight``).
        """
        wanted = "weight" if self.actorder == "static" else self.actorder
        resolved = []
        for scheme in super().schemes():
            weights = scheme.weights
            if weights.actorder is None and wanted is not None:
                scheme = attrs.evolve(scheme, weights=attrs.evolve(weights, actorder=wanted))
            resolved.append(scheme)
        return resolved

    def start(self, context: RunContext) -> GPTQRun:
        from llmc_gptq.run import GPTQRun

        return GPTQRun(config=self, schemes=self.schemes(), activations=self.activation_calibration())
