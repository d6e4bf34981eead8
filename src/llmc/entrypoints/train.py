"""``train``: fine-tune a model while the recipe's training modifiers act on every step.

Top to bottom: arguments → recipe (stage kinds checked before anything heavy) → output
directory check → model and tokenizer → training samples (and calibration batches if a one-shot
stage needs them) → the stages in recipe order (one-shot stages calibrate layer by layer,
training stages run the loop below) → report → checkpoint.

The loop, per optimizer step::

    llmc_train_batch_start → forward (+ llmc_train_loss terms) → backward
    → llmc_train_after_backward → clip → optimizer.step → llmc_train_optimizer_step_end
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from llmc.args import TRAIN_ARGUMENT_CLASSES, DatasetArguments, TrainingArguments, parse_arguments
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
from llmc.errors import DataError
from llmc.models import calibration_dtype, load_model, load_tokenizer
from llmc.moe import unfuse_experts_
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
    model_args, data_args, recipe_args, output_args, train_args = parse_arguments(
        kwargs, TRAIN_ARGUMENT_CLASSES
    )

    # 1. Recipe and output directory, before anything heavy.
    registry = load_registry()
    if recipe_args.recipe is None:
        recipe = Recipe(stages=(RecipeStage("finetune_stage", (), run_type=TRAIN),), source="<none>")
    else:
        recipe = load_recipe(
            recipe_args.recipe, registry, recipe_args=recipe_args.recipe_args, stage=recipe_args.stage
        )
    kinds = check_stage_kinds(recipe, TRAIN)
    if output_args.output_dir is not None:
        check_output_dir(output_args.output_dir, overwrite=output_args.overwrite)

    # 2. Model (fused MoE experts unfused into Linears), tokenizer, training samples, and
    #    calibration batches for one-shot stages.
    model = load_model(model_args)
    unfuse_experts_(model)
    tokenizer = load_tokenizer(model_args, model)
    pad_id = padding_token_id(tokenizer)
    train_samples = _training_samples(data_args, train_args, tokenizer, model_args.cache_dir)
    calibration = None
    one_shot_stages = [s for s, k in zip(recipe.stages, kinds) if k != TRAIN]
    if any(type(e.modifier).requires_calibration_data for s in one_shot_stages for e in s.modifiers):
        samples = load_calibration_data(data_args, tokenizer, cache_dir=model_args.cache_dir)
        calibration = make_batches(samples, data_args.batch_size, pad_id)

    # 3. The stages, in recipe order.
    context = RunContext(
        model=model,
        device=next(model.parameters()).device,
        tokenizer=tokenizer,
        compute_dtype=calibration_dtype(model_args, model),
    )
    losses: list[float] = []
    for stage, kind in zip(recipe.stages, kinds):
        if kind == TRAIN:
            losses += _train_stage(stage, model, context, train_samples, pad_id, train_args, data_args.seed)
        else:
            run_oneshot_stage(
                stage, model, context, calibration, data_args.sequential_targets,
                calibrate_all_experts=model_args.moe_calibrate_all_experts,
            )

    # 4. The report and the checkpoint.
    report, output_dir = write_results(
        model=model, tokenizer=tokenizer, recipe=recipe, registry=registry, context=context,
        model_args=model_args, output_args=output_args, started=started,
        extra={
            "train_samples": len(train_samples),
            "train_steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
        },
    )
    logger.info("train finished in %.1f s", time.perf_counter() - started)
    return TrainResult(model, tokenizer, recipe, report, output_dir)


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


def _schedule(train_args: TrainingArguments, total_steps: int):
    """Learning-rate multiplier per step: linear warmup, then cosine/linear decay or constant."""
    warmup = train_args.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if train_args.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train_args.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _train_stage(
    stage: RecipeStage,
    model: torch.nn.Module,
    context: RunContext,
    samples: list[torch.Tensor],
    pad_id: int,
    train_args: TrainingArguments,
    seed: int,
) -> list[float]:
    """Fine-tune with the stage's modifiers hooked into every optimizer step; returns the losses."""
    run_states = [entry.modifier.start(context) for entry in stage.modifiers]
    hook = make_lifecycle(run_states).hook
    batches = make_batches(samples, train_args.train_batch_size, pad_id)
    accumulation = train_args.gradient_accumulation_steps
    steps_per_epoch = max(1, len(batches) // accumulation)
    total_steps = train_args.max_steps or max(1, math.ceil(train_args.num_train_epochs * steps_per_epoch))
    context.steps_per_epoch, context.total_steps = steps_per_epoch, total_steps
    logger.info(
        "stage %s (train): %d modifiers, %d steps of %d x %d samples",
        stage.name, len(run_states), total_steps, accumulation, train_args.train_batch_size,
    )

    device = context.device
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_args.learning_rate,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(train_args, total_steps))
    order = _epoch_order(len(batches), seed)

    hook.llmc_initialize(context=context)
    hook.llmc_train_start(context=context, optimizer=optimizer)
    model.train()
    losses: list[float] = []
    progress = tqdm(range(total_steps), desc=f"training {stage.name}", unit="step")
    for step in progress:
        context.step = step
        hook.llmc_train_batch_start(context=context, step=step)
        step_loss = 0.0
        for _ in range(accumulation):
            batch = {k: v.to(device) for k, v in batches[next(order)].items()}
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=train_args.bf16):
                outputs = model(**batch, labels=labels)
                loss = outputs.loss
                for term in hook.llmc_train_loss(context=context, step=step, batch=batch, outputs=outputs, loss=loss):
                    loss = loss + term
            (loss / accumulation).backward()
            step_loss += loss.item() / accumulation
        hook.llmc_train_after_backward(context=context, step=step)
        if train_args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hook.llmc_train_optimizer_step_end(context=context, step=step)
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        if (step + 1) % train_args.logging_steps == 0 or step + 1 == total_steps:
            logger.info("step %d/%d loss %.4f lr %.3g", step + 1, total_steps, step_loss, scheduler.get_last_lr()[0])
    model.eval()
    hook.llmc_train_end(context=context)
    hook.llmc_finalize(context=context)
    return losses


def _epoch_order(count: int, seed: int):
    """Batch indices forever, reshuffled (seeded) every epoch."""
    generator = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        yield from torch.randperm(count, generator=generator).tolist()
