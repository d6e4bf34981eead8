"""A model whose weights stay in their safetensors files until a layer needs them.

For a model larger than memory, ``oneshot`` builds the model's skeleton with its parameters on
the meta device (no memory; buffers such as rotary frequencies are computed as usual) and reads
each decoder layer's tensors from the checkpoint files only when the pipeline reaches that
layer, straight onto the device it is calibrated on; after the layer is written it is released
again. The files are memory-mapped by safetensors, so only the tensors read are touched.

Which file and name hold each parameter is decided once, before any work: the skeleton's
state-dict names are mapped to the checkpoint's with transformers' own save-time conversion
(``revert_weight_conversion``, the inverse of what its loader does; Mixtral's ``mlp`` is
``block_sparse_moe`` in its files). A model whose tensors its loader merges or splits (fused
MoE experts, quantized checkpoints, GGUF) cannot be read a layer at a time that way; ``open``
then says why and the caller loads the model whole.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import attrs
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

__all__ = ["LazyWeights", "checkpoint_files"]

logger = logging.getLogger("llmc.lazy_weights")

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def checkpoint_files(folder: str | os.PathLike[str]) -> dict[str, Path] | str:
    """Checkpoint tensor name → the safetensors file holding it, or why there is none.

    A shard the index names that is missing is an error, not a fallback: loading the model
    whole would fail on it too.
    """
    folder = Path(folder)
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / shard for name, shard in weight_map.items()}
        missing = sorted({path.name for path in files.values() if not path.is_file()})
        if missing:
            from llmc.errors import ModelLoadError

            raise ModelLoadError(
                f"{index} names shard {missing[0]} but {folder} has no such file "
                f"({len(missing)} missing); copy the complete checkpoint"
            )
        return files
    single = folder / _SINGLE
    if single.is_file():
        try:
            with safe_open(str(single), "pt") as handle:
                return {name: single for name in handle.keys()}
        except SafetensorError as error:  # loading it whole reports it, in its own words
            return f"{single} cannot be read ({str(error).splitlines()[0]})"
    return f"{folder} holds no model.safetensors or {_INDEX}"


@attrs.define
class LazyWeights:
    """Where each parameter of a meta-device skeleton is in the checkpoint files.

    ``sources`` maps each parameter (and persistent buffer) object, by id, to every
    ``(owner module, local name)`` holding it (tied weights have several) and to the
    checkpoint name and file to read it from.
    """

    model: nn.Module
    files: dict[str, Path]
    owners: dict[int, list[tuple[nn.Module, str, bool]]]
    names: dict[int, str]
    prefixes: dict[int, list[str]]

    @classmethod
    def open(cls, model: nn.Module, files: dict[str, Path]) -> LazyWeights | str:
        """The map for ``model`` (a meta skeleton), or why its files cannot be read lazily."""
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion

        owners: dict[int, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
        prefixes: dict[int, list[str]] = defaultdict(list)
        tensors: dict[int, torch.Tensor] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for local, parameter in module._parameters.items():
                if parameter is not None:
                    owners[id(parameter)].append((module, local, True))
                    prefixes[id(parameter)].append(f"{module_name}.{local}" if module_name else local)
                    tensors[id(parameter)] = parameter
            for local, buffer in module._buffers.items():
                if buffer is not None and local not in module._non_persistent_buffers_set:
                    owners[id(buffer)].append((module, local, False))
                    prefixes[id(buffer)].append(f"{module_name}.{local}" if module_name else local)
                    tensors[id(buffer)] = buffer
        state = {key: tensors[tensor_id] for tensor_id, keys in prefixes.items() for key in keys}
        reverted = state
        if isinstance(model, PreTrainedModel):
            try:
                reverted = dict(revert_weight_conversion(model, dict(state)))
            except Exception as error:  # a conversion transformers cannot reverse on meta
                return f"transformers converts its weights on load ({error})"
        saved_as = {id(tensor): name for name, tensor in reverted.items()}
        names: dict[int, str] = {}
        for key, tensor in state.items():
            name = saved_as.get(id(tensor))
            if name is None:
                return f"transformers merges or splits {key} on load"
            if name in files:
                names[id(tensor)] = name
        unreadable = [
            keys[0] for tensor_id, keys in prefixes.items()
            if tensor_id not in names and tensors[tensor_id].device.type == "meta"
        ]
        if unreadable:
            return f"its files hold no tensor for {unreadable[0]} ({len(unreadable)} missing)"
        return cls(model=model, files=files, owners=dict(owners), names=names, prefixes=dict(prefixes))

    def _pending(self, module: nn.Module, recurse: bool) -> list[int]:
        """The skeleton tensors of ``module`` (and its children) still on the meta device."""
        seen: dict[int, None] = {}
        for sub in module.modules() if recurse else [module]:
            for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
                if tensor is not None and tensor.device.type == "meta" and id(tensor) in self.names:
                    seen[id(tensor)] = None
        return list(seen)

    @torch.no_grad()
    def load_(self, module: nn.Module, device: torch.device, *, recurse: bool = True) -> int:
        """Read ``module``'s tensors from the files onto ``device``; returns the bytes read.

        Each tensor keeps the dtype of its skeleton parameter (the precision asked for), and
        every owner of a tied tensor gets the same new one.
        """
        by_file: dict[Path, list[int]] = defaultdict(list)
        for tensor_id in self._pending(module, recurse):
            by_file[self.files[self.names[tensor_id]]].append(tensor_id)
        loaded = 0
        for path, tensor_ids in by_file.items():
            with safe_open(str(path), "pt", device="cpu") as handle:
                for tensor_id in tensor_ids:
                    owners = self.owners.pop(tensor_id)
                    name = self.names.pop(tensor_id)
                    owner, local, is_parameter = owners[0]
                    skeleton = owner._parameters[local] if is_parameter else owner._buffers[local]
                    value = handle.get_tensor(name)
                    if tuple(value.shape) != tuple(skeleton.shape):
                        from llmc.errors import ModelLoadError

                        raise ModelLoadError(
                            f"{self.prefixes[tensor_id][0]} has shape {tuple(value.shape)} in "
                            f"{path.name} but the model's config says {tuple(skeleton.shape)}"
                        )
                    value = value.to(device=device, dtype=skeleton.dtype)
                    _assign(owners, _like(skeleton, value))
                    loaded += value.numel() * value.element_size()
        return loaded

    @torch.no_grad()
    def release_(self, module: nn.Module) -> int:
        """Put every tensor of ``module`` on the meta device, so its memory is freed; returns the
        bytes released. The module is done: what compression added (scales, masks) goes too."""
        released = 0
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for local, tensor in table.items():
                    if tensor is None or tensor.device.type == "meta":
                        continue
                    released += tensor.numel() * tensor.element_size()
                    table[local] = _like(tensor, tensor.to("meta"))
        return released


def _like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as a Parameter with ``template``'s attributes when ``template`` is one."""
    if not isinstance(template, nn.Parameter):
        return value
    parameter = nn.Parameter(value, requires_grad=template.requires_grad)
    for attribute, attr_value in vars(template).items():
        setattr(parameter, attribute, attr_value)
    return parameter


def _assign(owners: list[tuple[nn.Module, str, bool]], value: torch.Tensor) -> None:
    for owner, local, is_parameter in owners:
        (owner._parameters if is_parameter else owner._buffers)[local] = value
