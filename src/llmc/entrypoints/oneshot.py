"""``oneshot``: calibrate and compress a model in one pass, no training.

The whole data flow, top to bottom: arguments → recipe (validated before anything heavy) →
output directory check → model and tokenizer → calibration data (only if a modifier needs it) →
layer-by-layer calibration with the recipe's modifiers → report → checkpoint.
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
from llmc.models import load_model, load_tokenizer
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.plugins import load_registry
from llmc.recipe import Recipe, load_recipe, recipe_to_yaml
from llmc.report import plot_report, report_json, summarize_rows
from llmc.save import check_output_dir, save_checkpoint

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
    if output_args.output_dir is not None:
        check_output_dir(output_args.output_dir, overwrite=output_args.overwrite)
    logger.info("recipe: %s", ", ".join(f"{e.plugin}.{e.name}" for e in recipe.modifiers))

    # 2. Model, tokenizer and, when a modifier needs them, calibration batches.
    model = load_model(model_args)
    tokenizer = load_tokenizer(model_args, model)
    device = next(model.parameters()).device
    batches = None
    if recipe.requires_calibration_data:
        samples = load_calibration_data(data_args, tokenizer, cache_dir=model_args.cache_dir)
        batches = make_batches(samples, data_args.batch_size, padding_token_id(tokenizer))
        logger.info("calibration data: %d samples in %d batches", len(samples), len(batches))
    elif data_args.dataset is not None:
        logger.info("the recipe is data-free; the dataset is not used")
    size_before = _parameter_bytes(model)

    # 3. Each stage runs its modifiers over the model, one block at a time.
    context = RunContext(model=model, device=device, tokenizer=tokenizer)
    for stage in recipe.stages:
        run_states = [entry.modifier.start(context) for entry in stage.modifiers]
        logger.info("stage %s: %d modifiers", stage.name, len(run_states))
        pipeline = LayerwisePipeline(
            model=model,
            context=context,
            lifecycle=make_lifecycle(run_states),
            sequential_targets=data_args.sequential_targets,
        )
        pipeline.run(batches)

    # 4. The report and the checkpoint.
    report = {
        "model": model_args.model if isinstance(model_args.model, str) else type(model).__name__,
        "recipe": recipe.source,
        "calibration_samples": sum(len(b["input_ids"]) for b in batches) if batches else 0,
        "seconds": round(time.perf_counter() - started, 2),
        "parameter_bytes_before": size_before,
        "summary": summarize_rows(context.report),
        "modules": context.report,
    }
    output_dir = None
    if output_args.output_dir is not None:
        extra_files: dict[str, str | bytes] = {
            "recipe.yaml": recipe_to_yaml(recipe, registry),
            "llmc_report.json": report_json(report),
        }
        plot = plot_report(context.report, title=f"{Path(str(report['model'])).name}: weight error")
        if plot is not None:
            extra_files["llmc_report.png"] = plot
        output_dir = save_checkpoint(
            model,
            tokenizer,
            output_args.output_dir,
            save_compressed=model_args.save_compressed,
            overwrite=output_args.overwrite,
            extra_files=extra_files,
        )
    logger.info("oneshot finished in %.1f s", time.perf_counter() - started)
    return OneshotResult(model, tokenizer, recipe, report, output_dir)


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
