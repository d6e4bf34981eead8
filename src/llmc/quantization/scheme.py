"""What a quantized Linear stores and how, in the terms of the compressed-tensors format.

The classes mirror compressed-tensors' ``QuantizationArgs`` and ``QuantizationScheme`` field for
field, so a scheme written into ``config.json`` is read back by transformers and vLLM unchanged,
and a ``config_groups`` entry copied from an llm-compressor recipe is accepted as is. They are
frozen attrs classes (not the pydantic originals) so that recipes, the CLI and plugins share one
validation story: every invalid value is an ``ArgumentError`` naming the field, what is allowed
and what was given.

Only what llmc can compute and save exactly is accepted: integer weights of 2 to 8 bits with a
tensor, channel or group scale; FP8 E4M3 weights (``type: float, num_bits: 8``) with a tensor,
channel or 128x128 block scale; the microscaling formats (FP4/FP6/FP8 in groups of 32 with
power-of-two E8M0 scales, ``scale_dtype: uint8``); NVFP4 (FP4 in groups of 16 with FP8 scales
under a float32 global scale, ``strategy: tensor_group``); dynamic input activations (integer of
4 or 8 bits or float, whatever the weights' type: W4A8, W4AFP8); static per-tensor input
activations (scales from an observer run on calibration data: the FP8 preset); and a static
KV-cache scheme. Everything else compressed-tensors knows (static per-channel or per-group
inputs, other scale dtypes) is refused up front with a message saying so, instead of producing a
checkpoint that fails to load.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

from llmc.errors import ArgumentError, did_you_mean
from llmc.quantization.grids import grid_of
from llmc.validators import is_bool, is_one_of

__all__ = [
    "ACTORDERS",
    "FORMATS",
    "OBSERVER_KWARGS",
    "NUM_BITS",
    "PRESET_ALIASES",
    "PRESET_SCHEMES",
    "UNSUPPORTED_PRESETS",
    "STRATEGIES",
    "QuantizationArgs",
    "QuantizationScheme",
    "args_from_config_dict",
    "kv_cache_args_from_config_dict",
    "preset_scheme",
    "scheme_from_config_dict",
    "schemes_from_config_groups",
]

NUM_BITS = (2, 3, 4, 5, 6, 7, 8)
INT_NUM_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_NUM_BITS = (4, 6, 8)  # FP4 E2M1, FP6 E2M3, FP8 E4M3
TYPES = ("int", "float")
STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
# Scale storage dtypes besides the weight's own: FP8 (NVFP4's group scales) and E8M0 (MX
# power-of-two scales, stored as a biased exponent in uint8).
SCALE_DTYPES = ("float8_e4m3fn", "uint8")
ZERO_POINT_DTYPES = ("int8", "float8_e4m3fn", "uint8")
# The one DynamicType that is not a bool: per-group scales at run time under a static global
# scale (NVFP4 activations).
LOCAL = "local"
# The observers (llm-compressor 0.14's names, ``observers.py``) and the observer_kwargs each takes.
_MSE_SEARCH = ("maxshrink", "patience", "grid", "norm")
OBSERVER_KWARGS: dict[str, tuple[str, ...]] = {
    "minmax": ("averaging_constant",),
    "static_minmax": (),
    "memoryless_minmax": (),
    "mse": (*_MSE_SEARCH, "averaging_constant"),
    "memoryless_mse": _MSE_SEARCH,
}
ACTORDERS = (None, "weight", "group", "static")
# Formats a group can be saved in; "dense" keeps the fake-quantized float weight.
FORMATS = (
    "pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "dense",
    "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized", "nvfp4-pack-quantized",
)
# The formats that can hold each kind of weight (compressed-tensors' compressors'
# can_compress), by (type, num_bits, scale_dtype).
_FORMATS_BY_KIND = {
    ("int", None): ("pack-quantized", "int-quantized", "naive-quantized", "dense"),
    ("float", 8, None): ("float-quantized", "naive-quantized", "dense"),
    ("float", 8, "uint8"): ("mxfp8-quantized",),
    ("float", 6, "uint8"): ("mxfp6-pack-quantized",),
    ("float", 4, "uint8"): ("mxfp4-pack-quantized",),
    ("float", 4, "float8_e4m3fn"): ("nvfp4-pack-quantized",),
}


def _formats_for(weights: QuantizationArgs) -> tuple[str, ...]:
    if weights.type == "int":
        return _FORMATS_BY_KIND[("int", None)]
    return _FORMATS_BY_KIND[("float", weights.num_bits, weights.scale_dtype)]
# Strategies of FP8 arguments: static tensor/channel/block weight scales, dynamic
# token/tensor/group input scales, MX groups of 32.
FLOAT_STRATEGIES = ("tensor", "channel", "token", "group", "block")
MX_GROUP_SIZE = 32
NVFP4_GROUP_SIZE = 16


def _quote(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _check_group_size(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ArgumentError(
            f"'group_size' must be a positive integer or None (got {_quote(value)})",
            name="group_size",
        )


def _check_actorder(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "group":
        raise ArgumentError(
            "'actorder' 'group' is not supported: it needs a g_idx tensor that compressed-tensors "
            "0.20 no longer loads; use actorder 'weight' (same accuracy gain, no runtime cost)",
            name="actorder",
        )
    is_one_of(ACTORDERS)(instance, attribute, value)


def _check_observer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value not in OBSERVER_KWARGS:
        raise ArgumentError(
            f"unknown observer {_quote(value)}{did_you_mean(str(value), OBSERVER_KWARGS)}",
            name="observer",
        )


def _observer_kwargs(value: Any) -> tuple[tuple[str, Any], ...]:
    # stored as sorted items so the arguments stay hashable (schemes are dict keys when saving)
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return tuple(value)


def _canonical_actorder(value: Any) -> Any:
    # compressed-tensors treats "static" as an alias of "weight"; store one spelling.
    return "weight" if value == "static" else value


def _dtype_name(value: Any) -> Any:
    """``torch.uint8``, ``"torch.uint8"`` and ``"uint8"`` are one dtype (compressed-tensors
    writes the ``torch.`` spelling); anything else is left for the validator to refuse."""
    if value is None:
        return None
    text = str(value)
    return text[len("torch."):] if text.startswith("torch.") else text


def _dtype_in(choices: tuple[str, ...]):
    listed = ", ".join(choices)

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value not in choices:
            raise ArgumentError(
                f"'{attribute.name}' must be one of {listed} or None (got {value!r})",
                name=attribute.name,
            )

    return check


def _block_structure(value: Any) -> Any:
    # compressed-tensors also reads the old "128x128" spelling.
    if isinstance(value, str) and "x" in value:
        parts = value.split("x")
        if all(p.strip().isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return tuple(value) if isinstance(value, list) else value


def _check_block_structure(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise ArgumentError(
            f"'block_structure' must be a pair of positive integers [rows, cols], e.g. "
            f"[128, 128] (got {_quote(list(value) if isinstance(value, tuple) else value)})",
            name="block_structure",
        )


def _dynamic(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _check_dynamic(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool) and value != LOCAL:
        raise ArgumentError(
            f"'dynamic' must be true, false or 'local' (got {_quote(value)})", name="dynamic"
        )


@attrs.frozen(kw_only=True)
class QuantizationArgs:
    """How one tensor (a weight, or a Linear's input) is mapped to integers or FP8 values.

    The fields and their JSON spelling are those of compressed-tensors' ``QuantizationArgs``.
    ``observer`` names how static parameters are estimated from what calibration saw
    (``llmc.quantization.observers``: ``minmax``, ``static_minmax``, ``mse``, ...), with
    ``observer_kwargs`` its settings (``averaging_constant``, ``grid``, ``norm``, ...); both
    are written to the config.
    """

    num_bits: int = attrs.field(validator=is_one_of(NUM_BITS))
    type: str = attrs.field(default="int", validator=is_one_of(TYPES))
    symmetric: bool = attrs.field(default=True, validator=is_bool)
    strategy: str = attrs.field(validator=is_one_of(STRATEGIES))
    group_size: int | None = attrs.field(default=None, validator=_check_group_size)
    block_structure: tuple[int, int] | None = attrs.field(
        default=None, converter=_block_structure, validator=_check_block_structure
    )
    dynamic: bool | str = attrs.field(default=False, converter=_dynamic, validator=_check_dynamic)
    actorder: str | None = attrs.field(
        default=None, converter=_canonical_actorder, validator=_check_actorder
    )
    observer: str | None = attrs.field(default="minmax", validator=_check_observer)
    observer_kwargs: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_observer_kwargs)
    scale_dtype: str | None = attrs.field(
        default=None, converter=_dtype_name, validator=_dtype_in(SCALE_DTYPES)
    )
    # Implied by the other fields for every scheme llmc accepts (see ``zero_point_dtype``); kept
    # out of equality so a scheme read back from a config (where compressed-tensors writes
    # null for symmetric schemes) equals the preset it came from.
    zp_dtype: str | None = attrs.field(
        default=None, converter=_dtype_name, validator=_dtype_in(ZERO_POINT_DTYPES), eq=False
    )

    def __attrs_post_init__(self) -> None:
        for key, _ in self.observer_kwargs:
            allowed = OBSERVER_KWARGS.get(self.observer or "minmax", ())
            if key not in allowed:
                takes = f"; it takes {', '.join(allowed)}" if allowed else "; it takes none"
                raise ArgumentError(
                    f"observer {self.observer!r} has no observer_kwargs {key!r}{takes}",
                    name="observer_kwargs",
                )
        grouped = self.strategy in ("group", "tensor_group")
        if grouped and self.group_size is None:
            raise ArgumentError(
                f"'group_size' is required when strategy is {self.strategy!r} (got None); "
                "set group_size, e.g. 128",
                name="group_size",
            )
        if not grouped and self.group_size is not None:
            raise ArgumentError(
                f"'group_size' must be None unless strategy is 'group' "
                f"(got group_size {self.group_size} with strategy {self.strategy!r})",
                name="group_size",
            )
        if (self.strategy == "block") != (self.block_structure is not None):
            raise ArgumentError(
                f"strategy 'block' and 'block_structure' go together (got strategy "
                f"{self.strategy!r} with block_structure "
                f"{list(self.block_structure) if self.block_structure else None})",
                name="block_structure",
            )
        if self.dynamic == LOCAL and self.strategy != "tensor_group":
            raise ArgumentError(
                f"'dynamic' 'local' (per-group scales at run time under a static global scale) "
                f"needs strategy 'tensor_group' (got {self.strategy!r})",
                name="dynamic",
            )
        if self.type == "int" and self.num_bits not in INT_NUM_BITS:
            listed = ", ".join(str(b) for b in INT_NUM_BITS)
            raise ArgumentError(
                f"'num_bits' {self.num_bits} with type 'int' is not supported; type 'int' takes "
                f"num_bits {listed}",
                name="num_bits",
            )
        if self.type == "int" and (self.scale_dtype or self.strategy in ("block", "tensor_group")):
            raise ArgumentError(
                f"type 'int' supports strategies 'tensor', 'channel', 'group', 'token' with "
                f"scales in the weight's dtype (got strategy {self.strategy!r}, scale_dtype "
                f"{self.scale_dtype!r})",
                name="strategy",
            )
        if self.strategy == "token" and not self.dynamic:
            raise ArgumentError(
                "strategy 'token' needs dynamic true: per-token scales are computed at run time",
                name="dynamic",
            )
        if self.dynamic and self.strategy in ("channel", "attn_head"):
            raise ArgumentError(
                "'dynamic' quantization supports strategies 'token', 'tensor', 'group' "
                f"(got {self.strategy!r})",
                name="strategy",
            )
        if self.type == "float":
            self._check_float()
        allowed = self.allowed_zp_dtypes
        if self.zp_dtype is not None and self.zp_dtype not in allowed:
            raise ArgumentError(
                f"'zp_dtype' must be {' or '.join(allowed)} for these arguments (got "
                f"{self.zp_dtype!r})",
                name="zp_dtype",
            )

    @property
    def allowed_zp_dtypes(self) -> tuple[str, ...]:
        """The zero-point dtypes compressed-tensors gives these arguments: int8 for integers,
        float8_e4m3fn for floats, or uint8 as its MX presets say."""
        if self.type == "int":
            return ("int8",)
        return ("float8_e4m3fn", "uint8") if self.is_mx else ("float8_e4m3fn",)

    def _check_float(self) -> None:
        if self.num_bits not in FLOAT_NUM_BITS:
            raise ArgumentError(
                f"'num_bits' {self.num_bits} with type 'float' is not supported; type 'float' "
                f"takes num_bits 4 (FP4 E2M1), 6 (FP6 E2M3) or 8 (FP8 E4M3)",
                name="num_bits",
            )
        if not self.symmetric:
            raise ArgumentError(
                f"type 'float' with {self.num_bits} bits must be symmetric (got symmetric "
                f"false): compressed-tensors and vLLM have no float zero points; set symmetric "
                f"true",
                name="symmetric",
            )
        if self.scale_dtype == "uint8":
            self._check_mx()
        elif self.scale_dtype == "float8_e4m3fn" or self.strategy == "tensor_group":
            self._check_nvfp4()
        elif self.num_bits != 8:
            raise ArgumentError(
                f"type 'float' with {self.num_bits} bits needs MX scales (strategy 'group', "
                f"group_size 32, scale_dtype uint8: MXFP4/MXFP6) or NVFP4's (strategy "
                f"'tensor_group', group_size 16, scale_dtype float8_e4m3fn) (got strategy "
                f"{self.strategy!r}, scale_dtype {self.scale_dtype!r})",
                name="scale_dtype",
            )
        elif self.strategy not in FLOAT_STRATEGIES and self.strategy != "attn_head":  # KV cache
            listed = ", ".join(repr(s) for s in FLOAT_STRATEGIES)
            raise ArgumentError(
                f"type 'float' with 8 bits (FP8) supports strategies {listed} (got "
                f"{self.strategy!r})",
                name="strategy",
            )
        elif self.strategy == "group" and not self.dynamic:
            raise ArgumentError(
                f"FP8 weight groups need E8M0 scales (MXFP8: group_size 32, scale_dtype uint8) "
                f"(got group_size {self.group_size}, scale_dtype None); groups with float "
                f"scales are for dynamic input activations",
                name="scale_dtype",
            )

    def _check_mx(self) -> None:
        if self.strategy != "group" or self.group_size != MX_GROUP_SIZE:
            raise ArgumentError(
                f"scale_dtype uint8 (MX power-of-two E8M0 scales) needs strategy 'group' with "
                f"group_size 32 (got strategy {self.strategy!r}, group_size {self.group_size})",
                name="scale_dtype",
            )

    def _check_nvfp4(self) -> None:
        is_nvfp4 = (
            self.num_bits == 4
            and self.strategy == "tensor_group"
            and self.group_size == NVFP4_GROUP_SIZE
            and self.scale_dtype == "float8_e4m3fn"
        )
        if not is_nvfp4:
            raise ArgumentError(
                f"FP8 scales under a global scale (NVFP4) need num_bits 4, strategy "
                f"'tensor_group', group_size 16 and scale_dtype float8_e4m3fn (got num_bits "
                f"{self.num_bits}, strategy {self.strategy!r}, group_size {self.group_size}, "
                f"scale_dtype {self.scale_dtype!r})",
                name="strategy",
            )

    @property
    def is_mx(self) -> bool:
        """Power-of-two scales stored as E8M0 exponents (compressed-tensors'
        ``should_generate_mx_scales``)."""
        return self.type == "float" and self.scale_dtype == "uint8"

    @property
    def has_global_scale(self) -> bool:
        """Local scales divided by a float32 ``*_global_scale`` (NVFP4's tensor_group)."""
        return self.strategy == "tensor_group"

    @property
    def zero_point_dtype(self) -> torch.dtype:
        """The dtype of (all-zero, for float) zero points, as compressed-tensors creates them."""
        if self.zp_dtype is not None:
            return getattr(torch, self.zp_dtype)
        if self.is_mx:
            return torch.uint8
        return grid_of(self).zero_point_dtype

    @property
    def q_min(self) -> int | float:
        """Smallest code, e.g. -8 for int4 or -448.0 for FP8 E4M3 (``grids.grid_of``)."""
        return grid_of(self).q_min

    @property
    def q_max(self) -> int | float:
        """Largest code, e.g. 7 for int4 or 448.0 for FP8 E4M3."""
        return grid_of(self).q_max

    def to_config_dict(self) -> dict[str, Any]:
        """The JSON object compressed-tensors reads for these arguments, with the keys
        llm-compressor writes. ``zp_dtype`` is null for symmetric schemes, as compressed-tensors
        serializes it; for asymmetric ones it is left out, so the reader infers it (int8)."""
        entry = {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "block_structure": list(self.block_structure) if self.block_structure else None,
            "dynamic": self.dynamic,
            "actorder": self.actorder,
            "observer": self.observer,
            "observer_kwargs": dict(self.observer_kwargs),
            "scale_dtype": f"torch.{self.scale_dtype}" if self.scale_dtype else None,
        }
        if self.symmetric:
            entry["zp_dtype"] = None
        return entry


def describe_float(args: QuantizationArgs) -> str:
    """'float', 'MXFP4', 'NVFP4', ...: the float format's usual name in messages."""
    if args.is_mx:
        return f"MXFP{args.num_bits}"
    return "NVFP4" if args.has_global_scale else "float"


def _weights_are_static(
    instance: Any, attribute: attrs.Attribute, value: QuantizationArgs | None
) -> None:
    if value is None:
        raise ArgumentError(
            "'weights' is required: schemes that quantize only activations are not supported yet",
            name="weights",
        )
    if not isinstance(value, QuantizationArgs):
        raise ArgumentError(
            f"'weights' must be QuantizationArgs (got {type(value).__name__})", name="weights"
        )
    if value.dynamic:
        raise ArgumentError(
            "'weights' must have dynamic false: weight scales are computed once, at compression",
            name="weights",
        )
    if value.strategy == "attn_head":
        raise ArgumentError(
            "'weights' cannot have strategy 'attn_head' (a KV-cache strategy); use tensor, "
            "channel or group",
            name="weights",
        )


def _check_inputs(
    instance: Any, attribute: attrs.Attribute, value: QuantizationArgs | None
) -> None:
    if value is None:
        return
    if not isinstance(value, QuantizationArgs):
        raise ArgumentError(
            f"'input_activations' must be QuantizationArgs or None (got {type(value).__name__})",
            name="input_activations",
        )
    # compressed-tensors 0.20 creates no per-channel input scale and broadcasts a static group
    # scale against the sequence dimension, so only a per-tensor static scale loads correctly.
    if not value.dynamic and value.strategy != "tensor":
        raise ArgumentError(
            f"static 'input_activations' (dynamic false) support strategy 'tensor' (got "
            f"{value.strategy!r}); use strategy tensor, or dynamic true for per-token or group "
            f"scales",
            name="input_activations",
        )
    if value.actorder is not None:
        raise ArgumentError(
            f"'input_activations' cannot have an actorder (got {value.actorder!r})",
            name="input_activations",
        )
    if value.strategy in ("channel", "block"):
        raise ArgumentError(
            f"'input_activations' support strategies 'token', 'tensor', 'group', "
            f"'tensor_group' (got {value.strategy!r})",
            name="input_activations",
        )


def _no_outputs(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        raise ArgumentError(
            "'output_activations' quantization is not supported; set it to None",
            name="output_activations",
        )


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _check_targets(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(t, str) and t for t in value):
        raise ArgumentError(
            f"'targets' must be a non-empty list of module names, 're:' regexes or class names "
            f"(got {list(value)!r})",
            name="targets",
        )


@attrs.frozen(kw_only=True)
class QuantizationScheme:
    """Which Linear modules are quantized, and how their weights and inputs are.

    ``targets`` uses compressed-tensors' matching rules: an exact module name, a ``re:`` regex
    on the module name, or a class name such as ``Linear``. It is stored as a tuple so that a
    scheme is immutable and hashable; lists are accepted.
    """

    targets: tuple[str, ...] = attrs.field(
        default=("Linear",), converter=_targets, validator=_check_targets
    )
    weights: QuantizationArgs | None = attrs.field(validator=_weights_are_static)
    input_activations: QuantizationArgs | None = attrs.field(
        default=None, validator=_check_inputs
    )
    output_activations: None = attrs.field(default=None, validator=_no_outputs)
    format: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(is_one_of(FORMATS))
    )

    def __attrs_post_init__(self) -> None:
        inputs = self.input_activations
        if inputs is not None and inputs.type == "int" and inputs.num_bits not in (4, 8):
            raise ArgumentError(
                f"integer input activations take num_bits 4 or 8 (got {inputs.num_bits}); "
                f"runtimes have no {inputs.num_bits}-bit activation kernels",
                name="input_activations",
            )
        if inputs is not None and self.weights.type == "float" and inputs.type == "int":
            raise ArgumentError(
                "float weights with int input activations have no compressed-tensors format; "
                "use float input activations (e.g. FP8_DYNAMIC) or none",
                name="input_activations",
            )
        allowed = _formats_for(self.weights)
        if self.format is not None and self.format not in allowed:
            listed = ", ".join(repr(f) for f in allowed)
            kind = self.weights.type if self.weights.type == "int" else describe_float(self.weights)
            raise ArgumentError(
                f"format {self.format!r} cannot hold {kind} weights; use one of "
                f"{listed} or leave format unset",
                name="format",
            )

    def to_config_dict(self) -> dict[str, Any]:
        """The ``config_groups`` entry compressed-tensors reads for this scheme."""
        return {
            "targets": list(self.targets),
            "weights": self.weights.to_config_dict() if self.weights else None,
            "input_activations": (
                self.input_activations.to_config_dict() if self.input_activations else None
            ),
            "output_activations": None,
            "format": self.format,
        }


_ARGS_KEYS = {a.name for a in attrs.fields(QuantizationArgs)}
# Keys compressed-tensors writes that carry no information for the schemes we support, when
# they hold their neutral value.
_ARGS_NEUTRAL: dict[str, Any] = {}
_SCHEME_KEYS = {a.name for a in attrs.fields(QuantizationScheme)}


def args_from_config_dict(entry: Mapping[str, Any], *, where: str = "weights") -> QuantizationArgs:
    """Build arguments from a compressed-tensors JSON object, with its defaults and inference.

    As in compressed-tensors, a missing ``strategy`` is inferred from ``group_size`` (absent:
    tensor; positive: group; -1: channel), and ``num_bits`` defaults to 8.
    """
    if not isinstance(entry, Mapping):
        raise ArgumentError(
            f"'{where}' must be a mapping of quantization arguments (got {type(entry).__name__})",
            name=where,
        )
    values = dict(entry)
    for key, neutral in _ARGS_NEUTRAL.items():
        if key in values:
            given = values.pop(key)
            if given not in (neutral, None):
                raise ArgumentError(
                    f"'{where}.{key}' is not supported (got {given!r}); remove it", name=key
                )
    # zp_dtype is implied by type and num_bits (int8, or float8_e4m3fn for float; MX presets
    # say uint8); compressed-tensors writes it for asymmetric schemes.
    zp_dtype = values.get("zp_dtype")
    is_float = str(values.get("type", "int")).lower() == "float"
    implied = "float8_e4m3fn" if is_float else "int8"
    allowed = (implied, "uint8") if is_float and _dtype_name(values.get("scale_dtype")) == "uint8" else (implied,)
    if zp_dtype is not None and _dtype_name(zp_dtype) not in allowed:
        kind = "FP8" if is_float else "integer"
        raise ArgumentError(
            f"'{where}.zp_dtype' must be {' or '.join(allowed)} for {kind} quantization (got "
            f"{zp_dtype!r})",
            name="zp_dtype",
        )
    unknown = sorted(set(values) - _ARGS_KEYS)
    if unknown:
        raise ArgumentError(
            f"unknown key {unknown[0]!r} in '{where}'{did_you_mean(unknown[0], _ARGS_KEYS)}",
            name=unknown[0],
        )
    if values.get("actorder") is False:
        values["actorder"] = None
    if isinstance(values.get("type"), str):
        values["type"] = values["type"].lower()
    if isinstance(values.get("strategy"), str):
        values["strategy"] = values["strategy"].lower()
    values.setdefault("num_bits", 8)
    group_size = values.get("group_size")
    if values.get("strategy") is None:
        if group_size is None:
            values["strategy"] = "tensor"
        elif group_size == -1:
            values["strategy"] = "channel"
        else:
            values["strategy"] = "group"
    if group_size == -1 and values["strategy"] == "channel":
        values["group_size"] = None
    return QuantizationArgs(**values)


def kv_cache_args_from_config_dict(entry: Any) -> QuantizationArgs | None:
    """The ``kv_cache_scheme`` of a recipe or config: static, symmetric, per tensor or head.

    vLLM reads one ``k_scale``/``v_scale`` per attention (or per KV head) and no zero point, and
    compressed-tensors calibrates them on the keys and values after RoPE; llm-compressor's
    default observer (``minmax``) applies when none is given.
    """
    if entry is None:
        return None
    args = entry if isinstance(entry, QuantizationArgs) else args_from_config_dict(entry, where="kv_cache_scheme")
    if args.dynamic or args.strategy not in ("tensor", "attn_head") or not args.symmetric:
        raise ArgumentError(
            f"'kv_cache_scheme' must be static (dynamic false), symmetric, with strategy "
            f"'tensor' or 'attn_head' (got dynamic {args.dynamic}, symmetric {args.symmetric}, "
            f"strategy {args.strategy!r})",
            name="kv_cache_scheme",
        )
    if args.actorder is not None:
        raise ArgumentError(
            f"'kv_cache_scheme' cannot have an actorder (got {args.actorder!r})", name="kv_cache_scheme"
        )
    return args


def scheme_from_config_dict(entry: Mapping[str, Any]) -> QuantizationScheme:
    """Build a scheme from one compressed-tensors ``config_groups`` entry.

    This is the form llm-compressor recipes use for explicit schemes, e.g.
    ``{"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": true,
    "strategy": "group", "group_size": 128}}``.
    """
    if not isinstance(entry, Mapping):
        raise ArgumentError(
            f"a config group must be a mapping with 'targets' and 'weights' "
            f"(got {type(entry).__name__})",
            name="config_groups",
        )
    unknown = sorted(set(entry) - _SCHEME_KEYS)
    if unknown:
        raise ArgumentError(
            f"unknown key {unknown[0]!r} in config group{did_you_mean(unknown[0], _SCHEME_KEYS)}",
            name=unknown[0],
        )
    if "targets" not in entry:
        raise ArgumentError(
            "config group has no 'targets'; add e.g. targets: [Linear]", name="targets"
        )
    weights = entry.get("weights")
    inputs = entry.get("input_activations")
    return QuantizationScheme(
        targets=entry["targets"],
        weights=args_from_config_dict(weights, where="weights") if weights is not None else None,
        input_activations=(
            args_from_config_dict(inputs, where="input_activations") if inputs is not None else None
        ),
        output_activations=entry.get("output_activations"),
        format=entry.get("format"),
    )


def schemes_from_config_groups(
    config_groups: Mapping[str, Any],
) -> dict[str, QuantizationScheme]:
    """Build every scheme of a ``config_groups`` mapping.

    A group is either a full entry (see ``scheme_from_config_dict``) or, as compressed-tensors
    allows, a preset name mapped to its list of targets: ``{"W4A16": ["Linear"]}``.
    """
    schemes = {}
    for name, entry in config_groups.items():
        if isinstance(entry, (list, tuple)):
            schemes[name] = preset_scheme(name, entry)
        else:
            schemes[name] = scheme_from_config_dict(entry)
    return schemes


def _int_args(num_bits: int, strategy: str, **kwargs: Any) -> QuantizationArgs:
    return QuantizationArgs(num_bits=num_bits, type="int", strategy=strategy, **kwargs)


def _fp8_args(strategy: str, **kwargs: Any) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, **kwargs)


def _int_weights_int_inputs(weight_bits: int, input_bits: int | None) -> QuantizationScheme:
    """compressed-tensors' ``W{w}A{a}`` family: int weights in groups of 128, and int inputs
    quantized per token at run time unless ``input_bits`` is None (A16)."""
    inputs = None
    if input_bits is not None:
        inputs = _int_args(input_bits, "token", dynamic=True, observer=None)
    return QuantizationScheme(
        weights=_int_args(weight_bits, "group", group_size=128), input_activations=inputs
    )


def _mx_args(num_bits: int, **kwargs: Any) -> QuantizationArgs:
    """FP4/FP6/FP8 in groups of 32 with E8M0 (power-of-two) scales (OCP microscaling)."""
    return QuantizationArgs(
        num_bits=num_bits, type="float", strategy="group", group_size=MX_GROUP_SIZE,
        scale_dtype="uint8", zp_dtype="uint8", **kwargs,
    )


def _nvfp4_args(**kwargs: Any) -> QuantizationArgs:
    """FP4 in groups of 16 with FP8 scales, divided by one float32 global scale."""
    return QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=NVFP4_GROUP_SIZE,
        scale_dtype="float8_e4m3fn", zp_dtype="float8_e4m3fn", **kwargs,
    )


_MX_INPUTS = {"dynamic": True, "observer": None}


# The presets of compressed-tensors llmc supports, with its names and definitions: W{2..8}A16,
# W{2..7}A8, W{2..4}A4 (int weights, group 128; dynamic per-token int inputs), W4A16_ASYM,
# W8A8/INT8 (per-channel int8 weights), W4AFP8 (int4 weights, dynamic FP8 inputs), FP8
# (per-tensor FP8 weights, static per-tensor FP8 inputs), FP8_DYNAMIC.
PRESET_SCHEMES: dict[str, QuantizationScheme] = {
    **{f"W{bits}A16": _int_weights_int_inputs(bits, None) for bits in range(2, 9)},
    **{f"W{bits}A8": _int_weights_int_inputs(bits, 8) for bits in range(2, 8)},
    **{f"W{bits}A4": _int_weights_int_inputs(bits, 4) for bits in range(2, 5)},
    "W4A16_ASYM": QuantizationScheme(
        weights=_int_args(4, "group", group_size=128, symmetric=False)
    ),
    "W8A8": QuantizationScheme(
        weights=_int_args(8, "channel"),
        input_activations=_int_args(8, "token", dynamic=True, observer=None),
    ),
    "W4AFP8": QuantizationScheme(
        weights=_int_args(4, "group", group_size=128),
        input_activations=_fp8_args("token", dynamic=True, observer=None),
    ),
    "FP8": QuantizationScheme(
        weights=_fp8_args("tensor"),
        input_activations=_fp8_args("tensor", observer="static_minmax"),
    ),
    "FP8_DYNAMIC": QuantizationScheme(
        weights=_fp8_args("channel"),
        input_activations=_fp8_args("token", dynamic=True, observer=None),
    ),
    "FP8_BLOCK": QuantizationScheme(
        weights=_fp8_args("block", block_structure=(128, 128)),
        input_activations=_fp8_args("group", group_size=128, dynamic=True, observer=None),
    ),
    "NVFP4A16": QuantizationScheme(weights=_nvfp4_args()),
    "NVFP4": QuantizationScheme(
        weights=_nvfp4_args(),
        input_activations=_nvfp4_args(dynamic=LOCAL, observer="static_minmax"),
    ),
    "MXFP4A16": QuantizationScheme(weights=_mx_args(4)),
    "MXFP4": QuantizationScheme(weights=_mx_args(4), input_activations=_mx_args(4, **_MX_INPUTS)),
    "MXFP4XFP8": QuantizationScheme(
        weights=_mx_args(4),
        input_activations=_fp8_args("group", group_size=128, dynamic=True, observer=None),
    ),
    "MXFP6A16": QuantizationScheme(weights=_mx_args(6)),
    "MXFP6A8": QuantizationScheme(weights=_mx_args(6), input_activations=_mx_args(8, **_MX_INPUTS)),
    "MXFP8A16": QuantizationScheme(weights=_mx_args(8)),
    "MXFP8": QuantizationScheme(weights=_mx_args(8), input_activations=_mx_args(8, **_MX_INPUTS)),
}
# compressed-tensors' other names for the same schemes.
PRESET_ALIASES = {"INT8": "W8A8"}

# The presets compressed-tensors 0.20 defines that llmc cannot produce (yet), each with the
# message it is refused with when there is more to say than "not supported yet; supported
# presets: ..." (a test keeps the names equal to the installed library's).
UNSUPPORTED_PRESETS: dict[str, str | None] = {
    "UNQUANTIZED": (
        "quantization scheme 'UNQUANTIZED' quantizes nothing; leave the modules out of "
        "targets or list them in ignore"
    ),
}


def _closest_presets(name: str) -> str:
    """'; did you mean A, B or C?' from the supported names, or the list of them."""
    supported = sorted({*PRESET_SCHEMES, *PRESET_ALIASES})
    matches = [repr(m) for m in difflib.get_close_matches(name, supported, n=3, cutoff=0.5)]
    if not matches:
        return f"; supported presets: {', '.join(supported)}"
    listed = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f"; did you mean {listed}?"


def preset_scheme(name: str, targets: Iterable[str] | str = ("Linear",)) -> QuantizationScheme:
    """The preset scheme called ``name`` (case-insensitive), applied to ``targets``.

    A name compressed-tensors defines that llmc cannot produce yet (``NVFP4``, ``W4AFP8``, ...)
    is refused as such, naming the supported presets; any other unknown name gets the closest
    supported names.
    """
    key = name.upper() if isinstance(name, str) else name
    key = PRESET_ALIASES.get(key, key)
    if key in PRESET_SCHEMES:
        return attrs.evolve(PRESET_SCHEMES[key], targets=targets)
    if key in UNSUPPORTED_PRESETS:
        supported = ", ".join(sorted({*PRESET_SCHEMES, *PRESET_ALIASES}))
        raise ArgumentError(
            UNSUPPORTED_PRESETS[key]
            or f"quantization scheme {key!r} is not supported yet; supported presets: {supported}",
            name="scheme",
        )
    raise ArgumentError(
        f"unknown quantization scheme {name!r}{_closest_presets(str(key))}", name="scheme"
    )
