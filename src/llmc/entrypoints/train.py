"""``train``: fine-tune a model while the recipe's training modifiers act on every step.

Top to bottom: arguments → recipe (stage kinds checked before anything heavy) → output
directory, Trainer arguments and resume points checked → model and tokenizer → training samples
(and calibration batches if a one-shot stage needs them) → the stages in recipe order (one-shot
stages calibrate layer by layer, training stages run on ``transformers.Trainer`` with the
modifiers' hooks in every step, see ``llmc.entrypoints.trainer``) → report → checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from llmc.args import (
    SELF_TEACHER,
    TRAIN_ARGUMENT_CLASSES,
    DatasetArguments,
    ModelArguments,
    TrainingArguments,
    field_owner,
    parse_arguments,
)
from llmc.context import RunContext
from llmc.data import (
    load_calibration_data,
    load_raw_dataset,
    make_batches,
    padding_token_id,
    tokenize_calibration_data,
)
from llmc.entrypoints.oneshot import OneshotResult
from llmc.entrypoints.stages import TRAIN, check_stage_kinds, run_oneshot_stage, write_results
from llmc.errors import ArgumentError, DataError, closest
from llmc.models import (
    TeacherSource,
    calibration_dtype,
    default_device,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from llmc.moe import unfuse_experts_
from llmc.multimodal import mark_encoders_
from llmc.pipeline import make_lifecycle
from llmc.plugins import load_registry
from llmc.recipe import Recipe, RecipeStage, load_recipe
from llmc.save import check_output_dir

__all__ = ["TrainResult", "train"]

logger = logging.getLogger("llmc.train")

TrainResult = OneshotResult


def train(**kwargs: Any) -> TrainResult:
    """Fine-tune a model with a recipe's modifiers active; see ``llmc train --help``.

    Without a recipe this is plain fine-tuning. Example (prune once, then recover accuracy with
    the zeros held)::

        train(model="llmc:tiny-llama", dataset="llmc:stdlib-docs", recipe=recipe_yaml,
              max_steps=200, learning_rate=1e-4, output_dir="tiny-sparse-ft")
    """
    started = time.perf_counter()
    model_args, data_args, recipe_args, output_args, train_args = _parse(kwargs)

    # 1. Recipe and output directory, before anything heavy.
    registry = load_registry()
    if recipe_args.recipe is None:
        recipe = Recipe(stages=(RecipeStage("finetune_stage", (), run_type=TRAIN),), source="<none>")
    else:
        recipe = load_recipe(
            recipe_args.recipe, registry, recipe_args=recipe_args.recipe_args, stage=recipe_args.stage
        )
    kinds = check_stage_kinds(recipe, TRAIN)
    needs_teacher = _check_teacher(recipe, model_args)
    output_dir = None
    if output_args.output_dir is not None:
        output_dir = check_output_dir(output_args.output_dir, overwrite=output_args.overwrite)
    from llmc.entrypoints.trainer import TrainingScratch, hf_training_arguments

    training_stages = [s.name for s, k in zip(recipe.stages, kinds) if k == TRAIN]
    scratch = TrainingScratch.for_output(output_dir)
    succeeded = False
    try:
        resume = scratch.prepare(train_args, training_stages)
        hf_training_arguments(  # transformers checks the values now, not after the model loads
            train_args, output_dir=scratch.root, seed=data_args.seed,
            use_cpu=_planned_device(model_args).type == "cpu",
        )

        # 2. Model (fused MoE experts unfused into Linears), tokenizer, training samples, and
        #    calibration batches for one-shot stages.
        model = load_model(model_args)
        unfuse_experts_(model)
        mark_encoders_(model)
        tokenizer = load_tokenizer(model_args, model)
        pad_id = padding_token_id(tokenizer)
        train_samples = _training_samples(data_args, train_args, tokenizer, model_args.cache_dir)
        calibration = None
        one_shot_stages = [s for s, k in zip(recipe.stages, kinds) if k != TRAIN]
        if any(e.modifier.requires_calibration_data for s in one_shot_stages for e in s.modifiers):
            samples = load_calibration_data(data_args, tokenizer, cache_dir=model_args.cache_dir)
            calibration = make_batches(samples, data_args.batch_size, pad_id)

        # 3. The stages, in recipe order (a "self" teacher is copied before the first).
        device = next(model.parameters()).device
        context = RunContext(
            model=model,
            device=device,
            tokenizer=tokenizer,
            compute_dtype=calibration_dtype(model_args, model, device),
            teacher=TeacherSource.for_run(model_args, model) if needs_teacher else None,
        )
        losses: list[float] = []
        train_seconds = 0.0
        for index, (stage, kind) in enumerate(zip(recipe.stages, kinds)):
            if kind == TRAIN:
                stage_losses, seconds = _train_stage(
                    stage, model, context, train_samples, pad_id, train_args,
                    seed=data_args.seed, output_dir=scratch.stage_dir(stage.name),
                    resume_from=resume[stage.name],
                )
                losses += stage_losses
                train_seconds += seconds
            else:
                run_oneshot_stage(
                    stage, model, context, calibration, data_args.sequential_targets,
                    calibrate_all_experts=model_args.moe_calibrate_all_experts,
                )
            if context.teacher is not None and not _uses_teacher(recipe.stages[index + 1 :]):
                context.teacher.release()
                context.teacher = None

        # 4. The report and the checkpoint.
        report, saved_to = write_results(
            model=model, tokenizer=tokenizer, recipe=recipe, registry=registry, context=context,
            model_args=model_args, output_args=output_args, started=started,
            extra={
                "train_samples": len(train_samples),
                "train_steps": len(losses),
                "train_s": round(train_seconds, 3),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "losses": losses,
            },
        )
        logger.info("train finished in %.1f s", time.perf_counter() - started)
        succeeded = True
    finally:
        scratch.close(succeeded=succeeded)
    return TrainResult(model, tokenizer, recipe, report, saved_to)


def _training_samples(
    data_args: DatasetArguments, train_args: TrainingArguments, tokenizer: Any, cache_dir: str | None
) -> list[torch.Tensor]:
    raw = load_raw_dataset(data_args, cache_dir=cache_dir)
    if len(raw) == 0:
        raise DataError("the training dataset is empty")
    wanted = train_args.max_train_samples or len(raw)
    samples = tokenize_calibration_data(raw, tokenizer, attrs.evolve(data_args, num_calibration_samples=wanted))
    logger.info("training data: %d samples of at most %d tokens", len(samples), data_args.max_seq_length)
    return samples


def _planned_device(model_args: ModelArguments) -> torch.device:
    """The device the model will train on, known before it is loaded."""
    model = model_args.model
    if model is not None and not isinstance(model, str):
        return next(model.parameters()).device
    return default_device(model_args.device)


def _uses_teacher(stages: Sequence[RecipeStage]) -> bool:
    return any(type(entry.modifier).requires_teacher for stage in stages for entry in stage.modifiers)


def _check_teacher(recipe: Recipe, model_args: ModelArguments) -> bool:
    """Whether the recipe distils; without a usable ``distill_teacher`` that fails now."""
    needing = [
        f"{stage.name}.{entry.name}"
        for stage in recipe.stages
        for entry in stage.modifiers
        if type(entry.modifier).requires_teacher
    ]
    teacher = model_args.distill_teacher
    if not needing:
        if teacher is not None:
            logger.warning("distill_teacher is given but no modifier in the recipe uses a teacher")
        return False
    if teacher is None:
        raise ArgumentError(
            f"{needing[0]} needs a teacher model: pass distill_teacher=... (a local directory, a "
            f"hub name, a loaded model, or {SELF_TEACHER!r} for a frozen copy of the model before "
            "the recipe's first stage)",
            name="distill_teacher",
        )
    if teacher is model_args.model and not isinstance(teacher, str):
        raise ArgumentError(
            f"distill_teacher is the model being trained; pass {SELF_TEACHER!r} for a frozen copy of it",
            name="distill_teacher",
        )
    if model_args.distill_teacher_device is not None:
        try:
            torch.device(model_args.distill_teacher_device)
        except (RuntimeError, TypeError):
            raise ArgumentError(
                "'distill_teacher_device' must be a torch device such as 'cpu', 'cuda' or "
                f"'cuda:1' (got {model_args.distill_teacher_device!r})",
                name="distill_teacher_device",
            ) from None
    if isinstance(teacher, str) and teacher != SELF_TEACHER:
        resolve_model_path(teacher)  # a mistyped path fails before minutes of one-shot stages
    return True


def _parse(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The argument classes; a transformers.TrainingArguments name is pointed to trainer_args."""
    owners = field_owner(TRAIN_ARGUMENT_CLASSES)
    unknown = [name for name in kwargs if name not in owners]
    if unknown and not any(closest(name, owners) for name in unknown):
        from llmc.entrypoints.trainer import trainer_field_names  # imports transformers

        theirs = set(trainer_field_names())
        for name in unknown:
            if name in theirs:
                raise ArgumentError(
                    f"{name!r} is a transformers.TrainingArguments field; pass it in "
                    f"trainer_args={{{name!r}: ...}} (CLI: --trainer-args {name}=...)",
                    name=name,
                )
    return parse_arguments(kwargs, TRAIN_ARGUMENT_CLASSES)


def _train_stage(
    stage: RecipeStage,
    model: torch.nn.Module,
    context: RunContext,
    samples: list[torch.Tensor],
    pad_id: int,
    train_args: TrainingArguments,
    *,
    seed: int,
    output_dir: Path,
    resume_from: Path | None,
) -> tuple[list[float], float]:
    """Fine-tune with the stage's modifiers hooked into every optimizer step.

    Returns the loss of every step and the seconds ``Trainer.train`` took (the report's
    ``train_s``: the training loop with the modifiers' hooks, without loading or saving).
    """
    from llmc.entrypoints.trainer import (
        LlmcTrainer,
        ModifierHooks,
        PaddingCollator,
        hf_training_arguments,
    )

    run_states = [entry.modifier.start(context) for entry in stage.modifiers]
    hook = make_lifecycle(run_states).hook
    args = hf_training_arguments(
        train_args, output_dir=output_dir, seed=seed, use_cpu=context.device.type == "cpu"
    )
    logger.info(
        "stage %s (train): %d modifiers, %s of %d x %d samples%s",
        stage.name, len(run_states),
        f"{train_args.max_steps} steps" if train_args.max_steps else f"{train_args.num_train_epochs:g} epochs",
        train_args.gradient_accumulation_steps, train_args.per_device_train_batch_size,
        f", resuming from {resume_from}" if resume_from else "",
    )
    hook.llmc_initialize(context=context)
    callback = ModifierHooks(hook, context)
    trainer = LlmcTrainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": sample} for sample in samples],
        data_collator=PaddingCollator(pad_id),
        llmc_hooks=callback,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    model.eval()
    hook.llmc_finalize(context=context)
    return callback.losses, seconds
