"""Where the model's weights live during a run, and how each layer gets onto the device.

``offload`` (``ModelArguments``) chooses:

* ``none``: the whole model is loaded on the calibration device, as transformers loads it.
* ``cpu``: the model is loaded into host memory and each decoder layer is moved to the
  calibration device for its passes and back after, so a GPU holds one layer, its statistics
  and a batch of activations.
* ``disk``: the model's skeleton is built without memory (``llmc.lazy_weights``); each layer is
  read from the checkpoint files onto the device when reached, compressed, written to a part
  file of the output as soon as it is done (``llmc.resume``) and released, so memory holds about
  one layer whatever the model's size, and a killed run resumes at its first unfinished layer.
  Needs a model given by path (safetensors files), an ``output_dir`` and a recipe of one
  one-shot stage; the model ``oneshot`` returns then holds no decoder-layer weights (load the
  checkpoint to use it). With ``layer_inputs='disk'`` the activations between layers are kept
  in memory-mapped files of the work folder too (``DiskStreaming.keep``).
* ``auto`` (default): ``none`` when the model fits comfortably (on the GPU: 85 % of its free
  memory; on CPU: 60 % of the available host memory), else ``cpu`` for a GPU run whose model
  fits in host memory, else ``disk`` when its conditions hold.

The pipeline talks to a ``LayerPlacement`` only: ``prepare`` before the first forward,
``onload`` before a layer's passes, ``done`` after its propagation pass, ``finish`` at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from llmc.args import OFFLOAD_MODES
from llmc.distributed import broadcast_object, gather_objects, is_writer, rank, world_size
from llmc.errors import ArgumentError, SaveError
from llmc.lazy_weights import LazyWeights
from llmc.masks import summarize_mask_
from llmc.resume import RunJournal
from llmc.save import compressed_state_dict
from llmc.save.atomic import pause_point

__all__ = [
    "OFFLOAD_MODES",
    "DiskStreaming",
    "HostOffload",
    "LayerPlacement",
    "available_host_bytes",
    "choose_offload",
    "layer_inputs_bytes",
]

logger = logging.getLogger("llmc.offload")

_GPU_SHARE = 0.85
_HOST_SHARE = 0.6


def available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_offload(
    requested: str, *, model_bytes: int | None, device: torch.device, disk_problem: str | None
) -> str:
    """The offload mode for a run (see module docstring); ``disk_problem`` says why ``disk`` is
    impossible for this run, or is None when it is possible."""
    if requested == "disk" and disk_problem is not None:
        raise ArgumentError(f"offload='disk' cannot be used here: {disk_problem}", name="offload")
    if requested != "auto":
        return requested
    if model_bytes is None:
        return "none"
    host = available_host_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if model_bytes < _GPU_SHARE * free:
            return "none"
        if host is None or model_bytes < _HOST_SHARE * host or disk_problem is not None:
            logger.info("the model (%.1f GB) does not fit on %s: offloading it to host memory", model_bytes / 1e9, device)
            return "cpu"
    elif host is None or model_bytes < _HOST_SHARE * host:
        return "none"
    if disk_problem is not None:
        logger.warning(
            "the model (%.1f GB) may not fit in memory, but it cannot be streamed from disk (%s); "
            "loading it whole", model_bytes / 1e9, disk_problem,
        )
        return "cpu" if device.type == "cuda" else "none"
    logger.info("the model (%.1f GB) does not fit in memory: streaming it a layer at a time", model_bytes / 1e9)
    return "disk"


class LayerPlacement:
    """The whole model stays where it was loaded (``offload='none'``)."""

    written_layers: tuple[str, ...] = ()

    def written_entries(self) -> list[Any]:
        """The tensors of ``written_layers``, as entries the checkpoint writer copies."""
        return []

    def prepare(self, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        """Before the first forward: what runs outside the blocks must be on the device."""

    def resume_point(self) -> tuple[int, Any, list[dict[str, Any]], list[dict[str, Any]]]:
        """(first layer to run, its inputs, report rows and layer stats of the layers done)."""
        return 0, None, [], []

    def onload(self, name: str, block: nn.Module) -> None:
        """Before a block's passes: its weights on the calibration device."""

    def keep(self, batch: Any) -> Any:
        """One batch of the next block's inputs, as the pipeline holds it (in host memory)."""
        return batch

    def done(
        self, index: int, name: str, block: nn.Module, next_inputs: Any,
        rows: list[dict[str, Any]], stats: dict[str, Any],
    ) -> None:
        """After a block's propagation pass."""

    def finish(self, model: nn.Module) -> None:
        """After the last block and ``llmc_finalize``."""


def _outside_blocks(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The modules holding tensors of their own that are not inside any block."""
    block_ids = {id(block) for _, block in blocks}
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        if id(module) in block_ids:
            return
        if module._parameters or module._buffers:
            found.append(module)
        for child in module.children():
            walk(child)

    walk(model)
    return found


def _move_own_tensors(modules: Sequence[nn.Module], device: torch.device) -> None:
    """Move the parameters and buffers of ``modules`` themselves (not their children); a tensor
    several of them share (tied embeddings) is moved once and stays shared."""
    moved: dict[int, torch.Tensor] = {}
    for module in modules:
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    value = tensor.to(device)
                    if isinstance(tensor, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    moved[id(tensor)] = value
                table[key] = moved[id(tensor)]


@attrs.define
class HostOffload(LayerPlacement):
    """Weights in host memory, each block on the calibration device only for its passes."""

    device: torch.device
    home: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    _outside: list[nn.Module] = attrs.field(factory=list)

    def prepare(self, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        self._outside = _outside_blocks(model, blocks)
        _move_own_tensors(self._outside, self.device)

    def onload(self, name: str, block: nn.Module) -> None:
        block.to(self.device)

    def done(self, index, name, block, next_inputs, rows, stats) -> None:  # noqa: ANN001
        block.to(self.home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self, model: nn.Module) -> None:
        _move_own_tensors(self._outside, self.home)


def _plain_batch(batch: Any) -> dict[str, Any]:
    """One batch's block inputs as lists, tuples, dicts and tensors only (what ``weights_only`` loads)."""
    return {"args": batch.args, "kwargs": batch.kwargs, "attention_mask": batch.attention_mask}


def _plain_inputs(inputs: Any) -> Any:
    return None if inputs is None else [_plain_batch(batch) for batch in inputs]


@attrs.define
class DiskStreaming(LayerPlacement):
    """Each block read from the model's files, written to a part file when done, released."""

    weights: LazyWeights
    journal: RunJournal
    device: torch.device
    save_compressed: bool
    model: nn.Module
    inputs_on_disk: bool = False  # layer_inputs='disk': every batch of inputs memory-mapped
    _blocks: list[str] = attrs.field(factory=list)
    _swapped: dict[str, nn.Module] = attrs.field(factory=dict)

    @property
    def written_layers(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.journal.finished)

    def written_entries(self) -> list[Any]:
        return self.journal.part_entries()

    def prepare(self, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        outside = _outside_blocks(model, blocks)
        for module in outside:
            self.weights.load_(module, self.device, recurse=False)
        _move_own_tensors(outside, self.device)
        self._blocks = [name for name, _ in blocks]

    def resume_point(self) -> tuple[int, Any, list[dict[str, Any]], list[dict[str, Any]]]:
        """Continue after the journal's finished layers: their modules get back what the
        checkpoint's config reads of them (scheme, mask summary), and each finished block is
        swapped for a ``FinishedLayer`` until ``finish``, so no modifier plans work in it."""
        done = len(self.journal.finished)
        if not done:
            return 0, None, [], []
        if self.journal.finished != self._blocks[:done]:
            raise SaveError(
                f"the interrupted run finished layers {self.journal.finished[:3]}..., which are not "
                "this model's first layers; run again with --no-resume"
            )
        from llmc.pipeline import BlockInputs

        for name in self.journal.finished:
            block = self.model.get_submodule(name)
            restore_module_records_(block, self.journal.modules.get(name, {}))
            self._swapped[name] = block
            self.model.set_submodule(name, FinishedLayer(name))
        plain = self.journal.next_inputs() if done < len(self._blocks) else None
        inputs = None if plain is None else [BlockInputs(**item) for item in plain]
        return done, inputs, self.journal.rows, self.journal.layer_stats

    def onload(self, name: str, block: nn.Module) -> None:
        self.weights.load_(block, self.device)
        block.to(self.device)

    def keep(self, batch: Any) -> Any:
        if not self.inputs_on_disk:
            return batch
        from llmc.pipeline import BlockInputs

        return BlockInputs(**self.journal.spill(_plain_batch(batch)))

    def done(self, index, name, block, next_inputs, rows, stats) -> None:  # noqa: ANN001
        tensors = {}
        if self.journal.writes:  # under torchrun rank 0 writes the parts
            tensors = compressed_state_dict(self.model, save_compressed=self.save_compressed, within=name)
            tensors = {key: tensor.detach().cpu() for key, tensor in tensors.items()}
        for module in block.modules():
            summarize_mask_(module)
        records = module_records(block)
        self.journal.layer_done(index, name, tensors, _plain_inputs(next_inputs), rows, stats, records)
        pause_point(f"after-layer-{index}")
        self.weights.release_(block)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self, model: nn.Module) -> None:
        for name, block in self._swapped.items():
            model.set_submodule(name, block)
        self._swapped.clear()


class FinishedLayer(nn.Module):
    """Stands in for a layer an interrupted run already wrote, while the rest of it runs."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.layer_name} was written by an earlier run and cannot run again")


def module_records(block: nn.Module) -> dict[str, Any]:
    """What the checkpoint's config needs of a written block's modules, as JSON."""
    from llmc.masks import mask_summary
    from llmc.quantization.module import is_quantized

    records: dict[str, Any] = {}
    for name, module in block.named_modules():
        record: dict[str, Any] = {}
        if is_quantized(module):
            scale = module.weight_scale
            record["scheme"] = module.quantization_scheme.to_config_dict()
            record["weight_scale"] = [list(scale.shape), str(scale.dtype).removeprefix("torch.")]
        summary = mask_summary(module)
        if summary is not None:
            record["mask"] = [summary.pruned, list(summary.structure) if summary.structure else None]
        if record:
            records[name] = record
    return records


def restore_module_records_(block: nn.Module, records: dict[str, Any]) -> None:
    """Put ``module_records`` back on a block's meta-device modules."""
    from llmc.masks import MaskSummary, restore_mask_summary_
    from llmc.quantization.scheme import scheme_from_config_dict

    for name, record in records.items():
        module = block.get_submodule(name)
        if "scheme" in record:
            shape, dtype = record["weight_scale"]
            module.quantization_scheme = scheme_from_config_dict(record["scheme"])
            if "weight_scale" not in module._parameters:
                module.register_buffer("weight_scale", torch.empty(shape, dtype=getattr(torch, dtype), device="meta"))
        if "mask" in record:
            pruned, structure = record["mask"]
            restore_mask_summary_(module, MaskSummary(pruned, tuple(structure) if structure else None))


def check_free_disk(work_dir: Path, needed: int) -> None:
    """Refuse a streamed run whose parts cannot fit on the output's file system."""
    probe = work_dir.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    logger.info("disk: the parts of the checkpoint need about %.2f GB; %.2f GB free", needed / 1e9, free / 1e9)
    if free < needed:
        raise SaveError(
            f"not enough disk space for the checkpoint next to {work_dir.parent}: about "
            f"{needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; free space or choose another output_dir"
        )


def streaming_settings(model_args: Any, data_args: Any) -> dict[str, Any]:
    """The arguments besides model, data and recipe that decide a streamed run's checkpoint."""
    return {
        "precision": model_args.precision,
        "calibration_precision": model_args.calibration_precision,
        "moe_calibrate_all_experts": model_args.moe_calibrate_all_experts,
        "save_compressed": model_args.save_compressed,
        "device": os.environ.get("CUDA_VISIBLE_DEVICES", "") + str(model_args.device),
        "sequential_targets": data_args.sequential_targets,
    }


def layer_inputs_bytes(batches: Sequence[Any] | None, model: nn.Module) -> int:
    """About what the activations passed between layers take: one hidden state per token."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not batches or not hidden:
        return 0
    dtype = next(model.parameters()).dtype
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    return tokens * hidden * dtype.itemsize


def disk_problem(model_folder: Path | None, output_dir: Any, stages: int) -> str | None:
    """Why this run cannot stream its model from disk, or None when it can."""
    if output_dir is None:
        return "each layer is written to output_dir when done, and no output_dir was given"
    if model_folder is None:
        return "the model must be a local folder of safetensors files (not an object, a hub name or a GGUF file)"
    if stages != 1:
        return f"the recipe has {stages} stages and a streamed run runs one"
    return None


def open_journal(
    output_dir: Path, *, model_files: Sequence[Path], recipe_text: str, batches: Any,
    settings: dict[str, Any], resume: bool,
) -> RunJournal:
    """The run's journal (resumed when it matches), after checking the disk has room.

    Under torchrun rank 0 opens it and decides whether to resume; the others take its decision.
    """
    from llmc.resume import fingerprint, work_dir_for

    digests = fingerprint(model_files=model_files, recipe_text=recipe_text, batches=batches, settings=settings)
    if world_size() > 1:  # every rank's share, in rank order: another rank count starts over
        shares = gather_objects(digests["calibration data"], "fingerprinting the calibration data")
        digests["calibration data"] = hashlib.sha256(" ".join(shares).encode()).hexdigest()
    journal = RunJournal.open(output_dir, digests, resume=resume, ranks=world_size()) if is_writer() else None
    state = broadcast_object(
        journal.state() if journal is not None else None, 0, torch.device("cpu"), "reading the run's journal"
    )
    if journal is None:
        journal = RunJournal.following(output_dir, digests, state, rank=rank(), ranks=world_size())
    check_free_disk(work_dir_for(output_dir), sum(path.stat().st_size for path in set(model_files)) // 2)
    return journal
