"""``oneshot``: calibrate and compress a model in one pass, no training.

The whole data flow, top to bottom: arguments → recipe (validated before anything heavy) →
output directory check → where the weights live (``llmc.offload``: on the device, in host
memory, or read from disk a layer at a time) → model (fused MoE experts unfused into Linears,
``llmc.moe``) and tokenizer → calibration data (only if a modifier needs it) → for a streamed
run, its journal (resuming an interrupted run, ``llmc.resume``) → layer-by-layer calibration
with the recipe's modifiers → report → checkpoint (a streamed run's layers already written).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from llmc.args import parse_arguments
from llmc.context import RunContext
from llmc.data import load_calibration_data, make_batches, padding_token_id
from llmc.distributed import (
    barrier,
    broadcast_object,
    is_writer,
    local_ranks,
    process_group,
    rank_device,
    rank_share,
    world_size,
)
from llmc.entrypoints.stages import ONESHOT, check_stage_kinds, run_oneshot_stage, write_results
from llmc.errors import ArgumentError
from llmc.lazy_weights import checkpoint_files
from llmc.models import (
    calibration_dtype,
    default_device,
    gguf_loaded_bytes,
    load_model,
    load_skeleton,
    load_tokenizer,
    local_model_folder,
)
from llmc.moe import unfuse_experts_
from llmc.multimodal import mark_encoders_
from llmc.offload import (
    DiskStreaming,
    HostOffload,
    LayerPlacement,
    choose_offload,
    disk_problem,
    layer_inputs_bytes,
    open_journal,
    streaming_settings,
)
from llmc.plugins import load_registry
from llmc.recipe import Recipe, load_recipe, recipe_to_yaml
from llmc.save import check_output_dir, output_path

__all__ = ["OneshotResult", "oneshot"]

logger = logging.getLogger("llmc.oneshot")


@attrs.frozen
class OneshotResult:
    """The compressed model (in memory, computing what the checkpoint computes) and its report."""

    model: torch.nn.Module
    tokenizer: Any
    recipe: Recipe
    report: dict[str, Any]
    output_dir: Path | None


def _check_calibration_data_given(recipe: Recipe, data_args: Any) -> None:
    """A recipe that needs data and none given fails before the model loads, naming why."""
    if not recipe.requires_calibration_data or data_args.dataset is not None or data_args.dataset_path is not None:
        return
    needing = next(e for e in recipe.modifiers if e.modifier.requires_calibration_data)
    reason = getattr(needing.modifier, "calibration_data_reason", None)
    raise ArgumentError(
        f"{needing.name} needs calibration data{f' ({reason})' if reason else ''} but no dataset "
        "was given; pass dataset=... (for example 'llmc:stdlib-docs')",
        name="dataset",
    )


def oneshot(**kwargs: Any) -> OneshotResult:
    """Compress a model with a recipe; see ``llmc oneshot --help`` for every argument.

    Example::

        oneshot(model="llmc:tiny-llama", recipe="llmc:w4a16", dataset="llmc:stdlib-docs",
                num_calibration_samples=64, output_dir="tiny-w4a16")
    """
    started = time.perf_counter()
    model_args, data_args, recipe_args, output_args = parse_arguments(kwargs)

    # 1. The recipe first: a typo or a missing plugin must fail before minutes of loading.
    registry = load_registry()
    recipe = load_recipe(
        recipe_args.recipe, registry, recipe_args=recipe_args.recipe_args, stage=recipe_args.stage
    )
    check_stage_kinds(recipe, ONESHOT)
    _check_calibration_data_given(recipe, data_args)
    output_dir = None
    if output_args.output_dir is not None and is_writer():
        output_dir = check_output_dir(output_args.output_dir, overwrite=output_args.overwrite)
    elif output_args.output_dir is not None:  # rank 0 checks (and clears leftovers) alone
        output_dir = output_path(output_args.output_dir)
    logger.info("recipe: %s", ", ".join(f"{e.plugin}.{e.name}" for e in recipe.modifiers))

    # 2. Under torchrun, each rank joins the process group (llmc.distributed): one share of the
    #    calibration data each, statistics reduced and solves shared in the pipeline, rank 0 writes.
    requested = default_device(model_args.device) if isinstance(model_args.model, str) or model_args.device else None
    with process_group(requested):
        # 3. Where the weights live (llmc.offload), the model (fused MoE experts become
        #    per-expert Linears), the tokenizer and, when a modifier needs them, calibration batches.
        folder = local_model_folder(model_args)
        files = checkpoint_files(folder) if folder is not None else None
        model_files = sorted(set(files.values())) if isinstance(files, dict) else []
        if model_files and (folder / "config.json").is_file():
            model_files.append(folder / "config.json")
        device = rank_device(requested)
        model_bytes = sum(p.stat().st_size for p in model_files) if model_files else gguf_loaded_bytes(model_args)
        mode = choose_offload(
            model_args.offload,
            # every rank on this machine holds its own copy in host memory
            model_bytes=model_bytes * local_ranks() if model_bytes else None,
            device=device or next(model_args.model.parameters()).device,
            disk_problem=disk_problem(folder, output_dir, len(recipe.stages)),
        )
        mode = broadcast_object(mode, 0, torch.device("cpu"), "choosing where the weights live")  # rank 0's
        skeleton = load_skeleton(model_args) if mode == "disk" else None
        if isinstance(skeleton, str):
            if model_args.offload == "disk":
                raise ArgumentError(f"offload='disk' cannot read this model a layer at a time: {skeleton}", name="offload")
            logger.warning("cannot stream the model from disk (%s): loading it into host memory", skeleton)
            mode, skeleton = "cpu", None
        if skeleton is not None:
            model, weights = skeleton
        else:
            model = load_model(model_args, device=torch.device("cpu") if mode == "cpu" else None)
        unfuse_experts_(model)
        mark_encoders_(model)
        tokenizer = load_tokenizer(model_args, model)
        batches, total_samples = None, 0
        if recipe.requires_calibration_data:
            samples = load_calibration_data(data_args, tokenizer, cache_dir=model_args.cache_dir)
            total_samples = len(samples)
            samples = rank_share(samples)
            batches = make_batches(samples, data_args.batch_size, padding_token_id(tokenizer))
            logger.info("calibration data: %d samples in %d batches", len(samples), len(batches))
        elif data_args.dataset is not None:
            logger.info("the recipe is data-free; the dataset is not used")
        size_before = sum(p.numel() * p.element_size() for p in model.parameters())
        calibration_device = device if mode in ("cpu", "disk") else next(model.parameters()).device
        context = RunContext(
            model=model,
            device=calibration_device,
            tokenizer=tokenizer,
            compute_dtype=calibration_dtype(model_args, model, calibration_device),
        )
        if model_args.layer_inputs == "disk" and mode != "disk":
            raise ArgumentError(
                f"layer_inputs='disk' keeps them in a streamed run's work folder and needs "
                f"offload='disk' (this run's offload is {mode!r})",
                name="layer_inputs",
            )
        if batches:
            logger.info(
                "layer inputs: %.2f GB kept between layers (%s)", layer_inputs_bytes(batches, model) / 1e9,
                "memory-mapped files" if model_args.layer_inputs == "disk" else "host memory",
            )
        placement: LayerPlacement = LayerPlacement()
        if mode == "cpu":
            placement = HostOffload(context.device)
        elif mode == "disk":
            journal = open_journal(
                output_dir, model_files=model_files, recipe_text=recipe_to_yaml(recipe, registry),
                batches=batches, settings=streaming_settings(model_args, data_args), resume=output_args.resume,
            )
            placement = DiskStreaming(
                weights, journal, context.device, model_args.save_compressed, model,
                inputs_on_disk=model_args.layer_inputs == "disk",
            )
        logger.info("offload: %s (calibrating on %s)", mode, context.device)

        # 4. Each stage runs its modifiers over the model, one block at a time; 5. the report and
        #    the checkpoint. A streamed run's journal stays for a rerun to resume if either fails.
        try:
            layer_stats = []
            for stage in recipe.stages:
                layer_stats += run_oneshot_stage(
                    stage, model, context, batches, data_args.sequential_targets,
                    calibrate_all_experts=model_args.moe_calibrate_all_experts, placement=placement,
                )
            report, output_dir = write_results(
                model=model, tokenizer=tokenizer, recipe=recipe, registry=registry, context=context,
                model_args=model_args, output_args=output_args, started=started,
                extra={
                    "calibration_samples": total_samples,
                    "ranks": world_size(),
                    "parameter_bytes_before": size_before,
                    "offload": mode,
                    **({"resumed_layers": placement.journal.resumed} if mode == "disk" else {}),
                    "layers": layer_stats,
                },
                placement=placement,
            )
        finally:
            if isinstance(placement, DiskStreaming):
                placement.journal.close()
        if isinstance(placement, DiskStreaming):
            placement.journal.remove()
        barrier("waiting for rank 0 to write the checkpoint")
    logger.info("oneshot finished in %.1f s", time.perf_counter() - started)
    return OneshotResult(model, tokenizer, recipe, report, output_dir)
