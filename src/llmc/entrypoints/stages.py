"""What ``oneshot`` and ``train`` share: running a recipe stage, and writing the results.

A stage is either a one-shot stage (modifiers act during layer-by-layer calibration) or a
training stage (modifiers act around optimizer steps). ``run_type`` in the recipe says which;
without it a stage is a training stage when every modifier in it supports training and the
entrypoint is ``train``, and a one-shot stage otherwise. So "SparseGPT 2:4, then fine-tune with
the mask held" is one recipe run by ``train``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmc.args import ModelArguments, OutputArguments
from llmc.context import RunContext
from llmc.distributed import is_writer
from llmc.errors import LlmcError, RecipeError
from llmc.offload import LayerPlacement
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.plugins import Registry
from llmc.recipe import Recipe, RecipeStage, recipe_to_yaml
from llmc.report import expert_summary, plot_expert_tokens, plot_report, report_json, summarize_rows
from llmc.save import output_path, plugin_config_entries, save_checkpoint

__all__ = ["check_stage_kinds", "run_oneshot_stage", "stage_kind", "write_results"]

logger = logging.getLogger("llmc.stages")

ONESHOT = "oneshot"
TRAIN = "train"


def stage_kind(stage: RecipeStage, entrypoint: str) -> str:
    """``oneshot`` or ``train``: how the stage runs under the given entrypoint."""
    if stage.run_type is not None:
        return stage.run_type
    if entrypoint == TRAIN and all(type(e.modifier).supports_training for e in stage.modifiers):
        return TRAIN
    return ONESHOT


def check_stage_kinds(recipe: Recipe, entrypoint: str) -> list[str]:
    """The kind of every stage, refusing stages the entrypoint or their modifiers cannot run.

    Checked before the model is loaded, so a wrong recipe costs nothing.
    """
    kinds = []
    problems = []
    for stage in recipe.stages:
        kind = stage_kind(stage, entrypoint)
        if kind not in (ONESHOT, TRAIN):
            problems.append(f"{stage.name}: run_type must be 'oneshot' or 'train' (got {kind!r})")
        elif kind == TRAIN and entrypoint == ONESHOT:
            problems.append(f"{stage.name} is a training stage; run the recipe with llmc train")
        siblings = tuple(entry.modifier for entry in stage.modifiers)
        for entry in stage.modifiers:
            modifier_class = type(entry.modifier)
            if kind == TRAIN and not modifier_class.supports_training:
                problems.append(f"{stage.name}.{entry.name} cannot run in a training stage")
            if kind == ONESHOT and not modifier_class.supports_oneshot:
                problems.append(f"{stage.name}.{entry.name} only runs in a training stage (llmc train)")
            try:
                entry.modifier.check_stage(siblings)
            except LlmcError as error:
                problems.append(f"{stage.name}.{entry.name}: {error}")
        kinds.append(kind)
    if problems:
        raise RecipeError("; ".join(problems), problems=problems)
    return kinds


def run_oneshot_stage(
    stage: RecipeStage,
    model: torch.nn.Module,
    context: RunContext,
    batches: Sequence[dict[str, torch.Tensor]] | None,
    sequential_targets: Sequence[str] | None,
    *,
    calibrate_all_experts: bool = True,
    placement: LayerPlacement | None = None,
) -> list[dict[str, Any]]:
    """The stage's modifiers over the model, one block at a time (``calibrate_all_experts``,
    ``placement``: see ``LayerwisePipeline``); returns each block's time and peak memory."""
    context.stage_modifiers = tuple(entry.modifier for entry in stage.modifiers)
    try:
        run_states = [entry.modifier.start(context) for entry in stage.modifiers]
        logger.info("stage %s (oneshot): %d modifiers", stage.name, len(run_states))
        pipeline = LayerwisePipeline(
            model=model,
            context=context,
            lifecycle=make_lifecycle(run_states),
            sequential_targets=sequential_targets,
            calibrate_all_experts=calibrate_all_experts,
            placement=placement or LayerPlacement(),
        )
        pipeline.run(batches)
    finally:
        context.stage_modifiers = ()
    return [{"stage": stage.name, **layer} for layer in pipeline.layer_stats]


def write_results(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    registry: Registry,
    context: RunContext,
    model_args: ModelArguments,
    output_args: OutputArguments,
    started: float,
    extra: dict[str, Any],
    placement: LayerPlacement | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """The run report, and the checkpoint with its recipe and report when an output is asked."""
    model_name = model_args.model if isinstance(model_args.model, str) else type(model).__name__
    config_entries = plugin_config_entries(registry.plugins.manager, model)
    report = {
        "model": model_name,
        "recipe": recipe.source,
        **extra,
        "seconds": round(time.perf_counter() - started, 2),
        "summary": summarize_rows(context.report),
        **expert_summary(context.report),
        **({"checkpoint_config": config_entries} if config_entries else {}),
        "modules": context.report,
    }
    if output_args.output_dir is None:
        return report, None
    if not is_writer():  # under torchrun rank 0 writes; the others have the same model and report
        return report, output_path(output_args.output_dir)
    extra_files: dict[str, str | bytes] = {
        "recipe.yaml": recipe_to_yaml(recipe, registry),
        "llmc_report.json": report_json(report),
    }
    plot = plot_report(context.report, title=f"{Path(str(model_name)).name}: per-module results")
    if plot is not None:
        extra_files["llmc_report.png"] = plot
    experts_plot = plot_expert_tokens(context.report, title=f"{Path(str(model_name)).name}: routed tokens per expert")
    if experts_plot is not None:
        extra_files["llmc_experts.png"] = experts_plot
    output_dir = save_checkpoint(
        model,
        tokenizer,
        output_args.output_dir,
        save_compressed=model_args.save_compressed,
        overwrite=output_args.overwrite,
        extra_files=extra_files,
        config_entries=config_entries,
        written_layers=placement.written_layers if placement else (),
        layer_entries=placement.written_entries() if placement else (),
    )
    return report, output_dir
