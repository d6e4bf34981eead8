"""``oneshot``: calibrate and compress a model in one pass, no training.

The whole data flow, top to bottom: arguments → recipe (validated before anything heavy) →
output directory check → model (fused MoE experts unfused into Linears, ``llmc.moe``) and
tokenizer → calibration data (only if a modifier needs it) → layer-by-layer calibration with the
recipe's modifiers → report → checkpoint.
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
from llmc.entrypoints.stages import ONESHOT, check_stage_kinds, run_oneshot_stage, write_results
from llmc.models import calibration_dtype, load_model, load_tokenizer
from llmc.moe import unfuse_experts_
from llmc.plugins import load_registry
from llmc.recipe import Recipe, load_recipe
from llmc.save import check_output_dir

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
    if output_args.output_dir is not None:
        check_output_dir(output_args.output_dir, overwrite=output_args.overwrite)
    logger.info("recipe: %s", ", ".join(f"{e.plugin}.{e.name}" for e in recipe.modifiers))

    # 2. Model (fused MoE experts become per-expert Linears), tokenizer and, when a modifier
    #    needs them, calibration batches.
    model = load_model(model_args)
    unfuse_experts_(model)
    tokenizer = load_tokenizer(model_args, model)
    batches = None
    if recipe.requires_calibration_data:
        samples = load_calibration_data(data_args, tokenizer, cache_dir=model_args.cache_dir)
        batches = make_batches(samples, data_args.batch_size, padding_token_id(tokenizer))
        logger.info("calibration data: %d samples in %d batches", len(samples), len(batches))
    elif data_args.dataset is not None:
        logger.info("the recipe is data-free; the dataset is not used")
    size_before = sum(p.numel() * p.element_size() for p in model.parameters())

    # 3. Each stage runs its modifiers over the model, one block at a time.
    context = RunContext(
        model=model,
        device=next(model.parameters()).device,
        tokenizer=tokenizer,
        compute_dtype=calibration_dtype(model_args, model),
    )
    for stage in recipe.stages:
        run_oneshot_stage(
            stage, model, context, batches, data_args.sequential_targets,
            calibrate_all_experts=model_args.moe_calibrate_all_experts,
        )

    # 4. The report and the checkpoint.
    report, output_dir = write_results(
        model=model, tokenizer=tokenizer, recipe=recipe, registry=registry, context=context,
        model_args=model_args, output_args=output_args, started=started,
        extra={
            "calibration_samples": sum(len(b["input_ids"]) for b in batches) if batches else 0,
            "parameter_bytes_before": size_before,
        },
    )
    logger.info("oneshot finished in %.1f s", time.perf_counter() - started)
    return OneshotResult(model, tokenizer, recipe, report, output_dir)
