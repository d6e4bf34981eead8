"""What a quantized Linear stores and how, in the terms of the compressed-tensors format.

The classes mirror compressed-tensors' ``QuantizationArgs`` and ``QuantizationScheme`` field for
field, so a scheme written into ``config.json`` is read back by transformers and vLLM unchanged,
and a ``config_groups`` entry copied from an llm-compressor recipe is accepted as is. They are
frozen attrs classes (not the pydantic originals) so that recipes, the CLI and plugins share one
validation story: every invalid value is an ``ArgumentError`` naming the field, what is allowed
and what was given.

Only what llmc can compute and save exactly is accepted: integer weights of 2 to 8 bits with a
tensor, channel or group scale, FP8 E4M3 weights (``type: float, num_bits: 8``) with a tensor or
channel scale, dynamic input activations (integer of 4 or 8 bits, or FP8, whatever the weights'
type: W4A8, W4AFP8), static per-tensor input activations of the weights' type (scales from an
observer run on calibration data: the FP8 preset), and a static KV-cache scheme. Everything else
compressed-tensors knows (FP4/MXFP, blocks) is refused up front with a message saying so,
instead of producing a checkpoint that fails to load.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

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
TYPES = ("int", "float")
STRATEGIES = ("tensor", "channel", "group", "token", "attn_head")
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
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "dense")
# The formats that can hold each weight type (compressed-tensors' compressors' can_compress).
_FORMATS_BY_TYPE = {
    "int": ("pack-quantized", "int-quantized", "naive-quantized", "dense"),
    "float": ("float-quantized", "naive-quantized", "dense"),
}
# Strategies of float (FP8) arguments: static tensor/channel weight scales, dynamic
# token/tensor input scales.
FLOAT_STRATEGIES = ("tensor", "channel", "token")


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
    dynamic: bool = attrs.field(default=False, validator=is_bool)
    actorder: str | None = attrs.field(
        default=None, converter=_canonical_actorder, validator=_check_actorder
    )
    observer: str | None = attrs.field(default="minmax", validator=_check_observer)
    observer_kwargs: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_observer_kwargs)

    def __attrs_post_init__(self) -> None:
        for key, _ in self.observer_kwargs:
            allowed = OBSERVER_KWARGS.get(self.observer or "minmax", ())
            if key not in allowed:
                takes = f"; it takes {', '.join(allowed)}" if allowed else "; it takes none"
                raise ArgumentError(
                    f"observer {self.observer!r} has no observer_kwargs {key!r}{takes}",
                    name="observer_kwargs",
                )
        if self.strategy == "group" and self.group_size is None:
            raise ArgumentError(
                "'group_size' is required when strategy is 'group' (got None); "
                "set group_size, e.g. 128",
                name="group_size",
            )
        if self.strategy != "group" and self.group_size is not None:
            raise ArgumentError(
                f"'group_size' must be None unless strategy is 'group' "
                f"(got group_size {self.group_size} with strategy {self.strategy!r})",
                name="group_size",
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

    def _check_float(self) -> None:
        if self.num_bits != 8:
            raise ArgumentError(
                f"'num_bits' {self.num_bits} with type 'float' (FP4/FP6: NVFP4, MXFP4) is not "
                f"supported yet; type 'float' takes num_bits 8 (FP8 E4M3)",
                name="num_bits",
            )
        if not self.symmetric:
            raise ArgumentError(
                "type 'float' (FP8) must be symmetric: vLLM has no FP8 zero points; set "
                "symmetric true",
                name="symmetric",
            )
        if self.strategy not in FLOAT_STRATEGIES and self.strategy != "attn_head":  # KV cache
            listed = ", ".join(repr(s) for s in FLOAT_STRATEGIES)
            raise ArgumentError(
                f"type 'float' (FP8) supports strategies {listed} (got {self.strategy!r}); "
                f"FP8 groups and blocks (MXFP8, FP8_BLOCK) are not supported yet",
                name="strategy",
            )

    @property
    def q_min(self) -> int | float:
        """Smallest code, e.g. -8 for int4 or -448.0 for FP8 E4M3 (``grids.grid_of``)."""
        return grid_of(self).q_min

    @property
    def q_max(self) -> int | float:
        """Largest code, e.g. 7 for int4 or 448.0 for FP8 E4M3."""
        return grid_of(self).q_max

    def to_config_dict(self) -> dict[str, Any]:
        """The JSON object compressed-tensors reads for these arguments."""
        return {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "block_structure": None,
            "dynamic": self.dynamic,
            "actorder": self.actorder,
            "observer": self.observer,
            "observer_kwargs": dict(self.observer_kwargs),
        }


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
        allowed = _FORMATS_BY_TYPE[self.weights.type]
        if self.format is not None and self.format not in allowed:
            listed = ", ".join(repr(f) for f in allowed)
            raise ArgumentError(
                f"format {self.format!r} cannot hold {self.weights.type} weights; use one of "
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
_ARGS_NEUTRAL = {"block_structure": None, "scale_dtype": None}
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
    # zp_dtype is implied by type and num_bits (int8, or float8_e4m3fn for FP8);
    # compressed-tensors writes it for asymmetric schemes.
    zp_dtype = values.pop("zp_dtype", None)
    is_float = str(values.get("type", "int")).lower() == "float"
    implied = "float8_e4m3fn" if is_float else "int8"
    if zp_dtype not in (None, f"torch.{implied}", implied):
        kind = "FP8" if is_float else "integer"
        raise ArgumentError(
            f"'{where}.zp_dtype' must be {implied} for {kind} quantization (got {zp_dtype!r})",
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
    **dict.fromkeys(
        (
            "FP8_BLOCK", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP4XFP8", "MXFP6A16",
            "MXFP6A8", "MXFP8A16", "MXFP8",
        )
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
