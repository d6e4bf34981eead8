"""The compressed-tensors view of a model quantized by llmc: its config dict and its tensors.

How each format lays out a Linear's tensors is ``llmc.save.formats`` (one registered writer
per format); this module assembles the config and the state dict from them.

Targets are matched by compressed-tensors as exact module names, ``re:`` regexes or class names
anywhere in the module's MRO. When every quantized Linear shares one scheme the config says
``targets: ["Linear"]`` and lists every other Linear in ``ignore`` (as llm-compressor does).
With several schemes each group lists its modules by exact name: a class-name target would
also catch vLLM's fused ``qkv_proj``/``gate_up_proj`` before their shards' exact names.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from llmc.errors import SaveError
from llmc.memory import return_freed_memory
from llmc.quantization.kv_cache import cached_attention_modules, kv_cache_args
from llmc.quantization.module import quantized_linears
from llmc.quantization.scheme import QuantizationScheme
from llmc.save.formats import format_writer, group_format

__all__ = [
    "compressed_state_dict",
    "group_format",
    "plugin_config_entries",
    "quantization_config",
    "with_config_entries",
]

QUANT_METHOD = "compressed-tensors"
# Modules packed between two returns of freed memory to the system.
_TRIM_EVERY = 32
# Version of the format written; compressed-tensors reads it for information only.
FORMAT_VERSION = "0.20.0"


def _format_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:
        return FORMAT_VERSION


def _is_linear_like(module: nn.Module) -> bool:
    """Whether compressed-tensors' class-name target ``Linear`` matches ``module``."""
    return any(cls.__name__ == "Linear" for cls in type(module).__mro__)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' target matching: exact name, ``re:`` regex, or class name in MRO."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def _scheme_key(scheme: QuantizationScheme) -> tuple:
    return (scheme.weights, scheme.input_activations, scheme.output_activations, scheme.format)


def quantization_config(
    model: nn.Module, ignore: list[str] | tuple[str, ...] = (), *, save_compressed: bool = True
) -> dict[str, Any] | None:
    """``config.json["quantization_config"]`` for ``model``, or None when nothing is quantized.

    ``ignore`` holds extra entries for the config's ignore list (names or ``re:`` regexes);
    every Linear left unquantized is listed anyway, so that a ``Linear`` target matches
    exactly the quantized modules. An entry that matches a quantized module is an error.
    """
    quantized = dict(quantized_linears(model))
    if not quantized:
        return None
    for entry in ignore:
        for name, module in quantized.items():
            if _matches(name, module, entry):
                raise SaveError(
                    f"ignore entry {entry!r} matches the quantized module {name}; remove it "
                    f"from ignore or leave {name} unquantized"
                )
    groups: dict[tuple, list[str]] = defaultdict(list)
    schemes: dict[tuple, QuantizationScheme] = {}
    for name, module in quantized.items():
        key = _scheme_key(module.quantization_scheme)
        groups[key].append(name)
        schemes.setdefault(key, module.quantization_scheme)

    quantized_ids = {id(m) for m in quantized.values()}
    unquantized = [
        name
        for name, module in model.named_modules()
        if _is_linear_like(module) and id(module) not in quantized_ids
    ]
    ignore_list = list(dict.fromkeys(ignore))
    for name in unquantized:
        module = model.get_submodule(name)
        if not any(_matches(name, module, entry) for entry in ignore_list):
            ignore_list.append(name)

    config_groups = {}
    formats = []
    for index, (key, names) in enumerate(groups.items()):
        scheme = schemes[key]
        fmt = group_format(scheme, save_compressed=save_compressed)
        formats.append(fmt)
        entry = scheme.to_config_dict()
        entry["targets"] = ["Linear"] if len(groups) == 1 else sorted(names)
        entry["format"] = fmt
        config_groups[f"group_{index}"] = entry
    distinct = set(formats)
    return {
        "config_groups": config_groups,
        "format": distinct.pop() if len(distinct) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": ignore_list,
        "kv_cache_scheme": _kv_cache_scheme(model),
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed" if save_compressed else "frozen",
        "sparsity_config": {},
        "transform_config": {},
        "version": _format_version(),
    }


def _kv_cache_scheme(model: nn.Module) -> dict[str, Any] | None:
    """The ``kv_cache_scheme`` the attention modules were calibrated with (one for the model)."""
    found = {kv_cache_args(module) for _, module in cached_attention_modules(model)} - {None}
    if len(found) > 1:
        raise SaveError(
            "attention modules were calibrated with different kv_cache_schemes; a checkpoint "
            "holds one, so use the same kv_cache_scheme for every modifier"
        )
    return found.pop().to_config_dict() if found else None


def _input_tensors(name: str, module: nn.Linear, *, save_compressed: bool) -> dict[str, torch.Tensor]:
    """A static input scale, and its zero point where the loader reads one: asymmetric, or a
    ``dense`` (frozen) checkpoint, for which compressed-tensors creates every zero point.

    NVFP4's inputs are scaled at run time under a static ``input_global_scale`` (a buffer the
    state dict keeps); without it the loader would run with an uninitialized one, so such a
    module is refused."""
    inputs = module.quantization_scheme.input_activations
    if inputs is not None and inputs.has_global_scale and not hasattr(module, "input_global_scale"):
        raise SaveError(
            f"{name} has NVFP4 input activations (strategy 'tensor_group') but no "
            f"input_global_scale; it comes from calibration data (activation observers), or use "
            f"NVFP4A16"
        )
    if inputs is None or inputs.dynamic:
        return {}
    if getattr(module, "input_scale", None) is None:
        raise SaveError(
            f"{name} has static input_activations but no input_scale: the modifier that "
            "quantized it did not calibrate its inputs; use a quantizer that does (QuantizationModifier, "
            "GPTQModifier, AWQModifier) or dynamic inputs"
        )
    tensors = {"input_scale": module.input_scale.detach()}
    if not save_compressed or not inputs.symmetric:
        tensors["input_zero_point"] = module.input_zero_point.detach()
    return tensors


def _module_tensors(module: nn.Linear, *, save_compressed: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear, by local name, from its format's writer."""
    fmt = group_format(module.quantization_scheme, save_compressed=save_compressed)
    return format_writer(fmt).tensors(module, save_compressed)


# Keys of quantization_config that describe core's quantized modules; plugins add beside them.
CORE_CONFIG_KEYS = frozenset(
    {"config_groups", "format", "global_compression_ratio", "ignore", "quant_method", "quantization_status", "version"}
)


def plugin_config_entries(plugin_manager: Any, model: nn.Module) -> dict[str, Any]:
    """What the plugins' ``llmc_checkpoint_config`` hooks add to ``quantization_config``.

    Each implementation is called on its own so a key two plugins return, or a key of core's,
    is refused naming the plugin.
    """
    entries: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for impl in plugin_manager.hook.llmc_checkpoint_config.get_hookimpls():
        returned = impl.function(model=model)
        if returned is None:
            continue
        if not isinstance(returned, dict):
            raise SaveError(
                f"plugin {impl.plugin_name!r}: llmc_checkpoint_config must return a dict or None "
                f"(got {type(returned).__name__})"
            )
        for key, value in returned.items():
            if key in CORE_CONFIG_KEYS:
                raise SaveError(
                    f"plugin {impl.plugin_name!r} may not set quantization_config[{key!r}], which core writes"
                )
            if key in owner:
                raise SaveError(
                    f"plugins {owner[key]!r} and {impl.plugin_name!r} both set "
                    f"quantization_config[{key!r}]; disable one (LLMC_DISABLE_PLUGINS)"
                )
            owner[key] = impl.plugin_name
            entries[key] = value
    return entries


def with_config_entries(quant_config: dict[str, Any] | None, entries: dict[str, Any]) -> dict[str, Any] | None:
    """``quant_config`` with the plugins' entries added.

    A model with nothing quantized keeps no ``quantization_config`` at all, entries or not: it
    is a plain dense checkpoint that loads without compressed-tensors (a pruned model's
    sparsity record is then in the run report only).
    """
    if quant_config is None or not entries:
        return quant_config
    return {**quant_config, **entries}


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _declared_tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys transformers declares as copies of another (``_tied_weights_keys``)."""
    keys = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or {}
        keys.extend(f"{prefix}.{k}" if prefix else k for k in tied)
    return keys


def _is_declared(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if name == pattern:
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def _drop_aliases(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Write each storage once, keeping the name transformers re-ties on load.

    As in transformers' ``save_pretrained``: of identical aliases, the keys declared in
    ``_tied_weights_keys`` (``lm_head.weight`` under ``tie_word_embeddings``) are dropped;
    aliases that are distinct views are cloned; anything else is an error.
    """
    by_storage: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel():
            by_storage[_storage_key(tensor)].append(name)
    declared = _declared_tied_keys(model)
    for names in by_storage.values():
        if len(names) < 2:
            continue
        first = state[names[0]]
        identical = all(
            state[n].data_ptr() == first.data_ptr()
            and state[n].shape == first.shape
            and state[n].stride() == first.stride()
            for n in names
        )
        if not identical:
            for name in names:
                state[name] = state[name].clone()
            continue
        keep = [n for n in names if not _is_declared(n, declared)]
        if len(keep) != 1:
            raise SaveError(
                f"tensors {', '.join(sorted(names))} share storage but the model declares "
                f"{'all' if not keep else 'none'} of them as tied; untie them "
                f"(e.g. clone the weight) before saving"
            )
        for name in names:
            if name not in keep:
                del state[name]


def _revert_weight_renaming(
    model: nn.Module, state: dict[str, torch.Tensor], kept: set[str]
) -> dict[str, torch.Tensor]:
    """Undo transformers' load-time weight conversions, as ``save_pretrained`` does.

    The keys come out as the model's checkpoints name them (Mixtral's ``mlp`` back to
    ``block_sparse_moe``; an MoE's experts are already per-expert Linears, ``llmc.moe``, so no
    fused tensor is split here). The quantized modules' tensors (``kept``) may be renamed but
    must come out unchanged, since the loader reads them as they are: one merged or split by a
    conversion is an error.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    if not isinstance(model, PreTrainedModel):
        return state
    reverted = revert_weight_conversion(model, state)
    if reverted is state:
        return state
    reverted = dict(reverted)
    written = {id(tensor) for tensor in reverted.values()}
    converted = sorted(key for key in kept if id(state[key]) not in written)
    if converted:
        raise SaveError(
            f"transformers converts weights of this model on save, including the quantized "
            f"{converted[0]}; saving quantized modules of such models is not supported yet"
        )
    return reverted


def _in_part(key: str, within: str | None, skip: tuple[str, ...]) -> bool:
    if within is not None and not key.startswith(f"{within}."):
        return False
    return not any(key.startswith(f"{prefix}.") for prefix in skip)


@torch.no_grad()
def compressed_state_dict(
    model: nn.Module, *, save_compressed: bool, within: str | None = None, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each quantized Linear in its compressed-tensors form.

    Unquantized tensors are returned as they are (aliases removed as transformers does), so
    nothing is copied except the compressed weights. ``within`` (a module name) keeps only
    that module's tensors and ``skip`` leaves out those of the modules named: a streamed run
    writes each layer on its own as it finishes, and the rest of the model at the end.
    """
    state = {
        key: tensor for key, tensor in model.state_dict().items() if _in_part(key, within, skip)
    }
    quantized = {
        name: module for name, module in quantized_linears(model)
        if _in_part(f"{name}.weight", within, skip)
    }
    weight_owner = {_storage_key(m.weight): n for n, m in quantized.items()}
    for key, tensor in state.items():
        owner = weight_owner.get(_storage_key(tensor)) if tensor.numel() else None
        if owner is not None and key != f"{owner}.weight":
            raise SaveError(
                f"{key} shares its storage with the quantized {owner}.weight (tied weights); "
                f"leave {owner} unquantized (e.g. ignore it) or untie the weights first"
            )
    compressed_keys = set()
    for count, (name, module) in enumerate(quantized.items(), 1):
        if count % _TRIM_EVERY == 0:
            return_freed_memory()  # packing temporaries (llmc.memory explains why)
        for local in (
            "weight", "weight_scale", "weight_zero_point", "weight_global_scale", "input_scale",
            "input_zero_point",
        ):
            state.pop(f"{name}.{local}", None)
        tensors = _module_tensors(module, save_compressed=save_compressed)
        tensors.update(_input_tensors(name, module, save_compressed=save_compressed))
        for local, tensor in tensors.items():
            state[f"{name}.{local}"] = tensor
            compressed_keys.add(f"{name}.{local}")
    _drop_aliases(state, model)
    return _revert_weight_renaming(model, state, compressed_keys)
