"""One training stage on ``transformers.Trainer``, with the stage's modifiers in every step.

Where each training hook fires (``ModifierHooks`` is a ``TrainerCallback``, ``LlmcTrainer`` a
small ``Trainer`` subclass)::

    llmc_initialize                      before the Trainer is built
    on_train_begin                     → llmc_train_start(context, optimizer)
    per optimizer step:
      on_step_begin                    → llmc_train_batch_start(context, step)
      per micro-batch: compute_loss    → task loss + every llmc_train_loss term; backward
      training_step, last micro-batch  → llmc_train_after_backward(context, step)
      Trainer: clip (max_grad_norm), optimizer.step
      on_optimizer_step                → llmc_train_optimizer_step_end(context, step)
    on_train_end                       → llmc_train_end(context)
    llmc_finalize                        after the Trainer returns

The task loss is the model's mean over the micro-batch's labelled tokens (labels are the inputs
with padding set to -100), divided by the accumulation steps, as every added term is.

The Trainer's own checkpoints (``save_steps``: weights, optimizer, schedule, RNG states) go to a
scratch folder beside the output directory, ``.<name>.train/<stage>/checkpoint-N``, never into
the output directory, which ``save_checkpoint`` fills atomically at the end. The scratch folder
is removed once the final checkpoint is written and kept when the run fails, so
``resume_from_checkpoint=True`` can continue it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import transformers

from llmc.args import TrainingArguments, unknown_names_message
from llmc.context import RunContext
from llmc.data import make_batches
from llmc.errors import ArgumentError, root_cause_line

__all__ = [
    "LlmcTrainer",
    "ModifierHooks",
    "PaddingCollator",
    "TrainingScratch",
    "check_trainer_args",
    "hf_training_arguments",
    "trainer_field_names",
]

logger = logging.getLogger("llmc.train")

# transformers.TrainingArguments fields that train sets itself, never through trainer_args.
TRAIN_OWNED = {
    "output_dir": "the checkpoint goes to output_dir, the Trainer's own checkpoints to a scratch "
                  "folder beside it",
    "seed": "pass seed=... (it seeds the data shuffle and the Trainer)",
}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def trainer_field_names() -> list[str]:
    """The names ``transformers.TrainingArguments`` accepts."""
    return [field.name for field in dataclasses.fields(transformers.TrainingArguments) if field.init]


def check_trainer_args(trainer_args: Mapping[str, Any] | None) -> None:
    """Refuse ``trainer_args`` names transformers does not know, and names train sets itself."""
    if not trainer_args:
        return
    valid = trainer_field_names()
    unknown = [name for name in trainer_args if name not in valid]
    if unknown:
        raise ArgumentError(
            "trainer_args: "
            + unknown_names_message(unknown, valid, kind="transformers.TrainingArguments field"),
            name="trainer_args",
        )
    ours = {field.name for field in attrs.fields(TrainingArguments)}
    for name in trainer_args:
        if name in ours:
            raise ArgumentError(
                f"trainer_args: {name!r} is an argument of train itself; pass {name}=... directly",
                name="trainer_args",
            )
        if name in TRAIN_OWNED:
            raise ArgumentError(
                f"trainer_args cannot set {name!r}: {TRAIN_OWNED[name]}", name="trainer_args"
            )


def hf_training_arguments(
    train_args: TrainingArguments, *, output_dir: Path, seed: int, use_cpu: bool
) -> transformers.TrainingArguments:
    """``transformers.TrainingArguments`` for one stage: our fields, then ``trainer_args``."""
    check_trainer_args(train_args.trainer_args)
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": train_args.max_steps or -1,
        "num_train_epochs": train_args.num_train_epochs,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "learning_rate": train_args.learning_rate,
        "weight_decay": train_args.weight_decay,
        "lr_scheduler_type": train_args.scheduler_type,
        "warmup_steps": train_args.warmup_steps,
        "max_grad_norm": train_args.max_grad_norm,
        "bf16": train_args.bf16,
        "logging_strategy": "steps",
        "logging_steps": train_args.logging_steps,
        "save_strategy": "steps" if train_args.save_steps else "no",
        "save_steps": train_args.save_steps or 500,
        "seed": seed,
        "report_to": list(train_args.report_to),
        "remove_unused_columns": False,  # our collator builds exactly the model's inputs
        "use_cpu": use_cpu,
        "dataloader_pin_memory": not use_cpu,
        **(train_args.trainer_args or {}),
    }
    try:
        return transformers.TrainingArguments(**values)
    except (TypeError, ValueError) as error:
        raise ArgumentError(
            f"transformers.TrainingArguments refused the training arguments: {root_cause_line(error)}",
            name="trainer_args",
        ) from None


@attrs.frozen
class PaddingCollator:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` with padding set to -100."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        (batch,) = make_batches([f["input_ids"] for f in features], len(features), self.pad_token_id)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # [B, L]
        return batch


class ModifierHooks(transformers.TrainerCallback):
    """Calls the stage's training hooks from the Trainer's events; keeps the loss of each step."""

    def __init__(self, hook: Any, context: RunContext) -> None:
        self.hook = hook
        self.context = context
        self.losses: list[float] = []
        self.step_loss = 0.0

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        self.context.steps_per_epoch = max(1, batches // accumulation + int(batches % accumulation > 0))
        self.context.total_steps = state.max_steps
        self.context.step = state.global_step
        self.hook.llmc_train_start(context=self.context, optimizer=optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.context.step = state.global_step
        self.step_loss = 0.0
        self.hook.llmc_train_batch_start(context=self.context, step=state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.hook.llmc_train_optimizer_step_end(context=self.context, step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.losses.append(self.step_loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            logger.info(
                "step %d/%d loss %.4f lr %.3g", state.global_step, state.max_steps, logs["loss"],
                logs.get("learning_rate", float("nan")),
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.llmc_train_end(context=self.context)


class LlmcTrainer(transformers.Trainer):
    """``Trainer`` whose loss includes the modifiers' terms, and which tells them of each backward."""

    def __init__(self, *args: Any, llmc_hooks: ModifierHooks, **kwargs: Any) -> None:
        super().__init__(*args, callbacks=[llmc_hooks], **kwargs)
        self.llmc_hooks = llmc_hooks
        # The model's loss is then the mean over each micro-batch's tokens, like the modifiers'
        # terms, and the Trainer divides the sum by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            hooks = self.llmc_hooks
            step = self.state.global_step
            for term in hooks.hook.llmc_train_loss(
                context=hooks.context, step=step, batch=inputs, outputs=outputs, loss=loss
            ):
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        hooks = self.llmc_hooks
        hooks.step_loss += float(loss)
        if self.accelerator.sync_gradients:  # the step's last micro-batch: gradients complete
            hooks.hook.llmc_train_after_backward(context=hooks.context, step=self.state.global_step)
        return loss


@attrs.frozen
class TrainingScratch:
    """Where the Trainer's own checkpoints go: ``<root>/<stage>/checkpoint-N``.

    ``root`` is ``.<name>.train`` beside ``output_dir`` (a name the next run finds, unlike the
    pid-named temporary siblings of ``llmc.save``, which a later run removes), or a temporary
    folder when nothing is saved.
    """

    root: Path
    temporary: bool

    @classmethod
    def for_output(cls, output_dir: Path | None) -> TrainingScratch:
        if output_dir is None:
            return cls(Path(tempfile.mkdtemp(prefix="llmc-train-")), temporary=True)
        return cls(output_dir.parent / f".{output_dir.name}.train", temporary=False)

    def stage_dir(self, stage: str) -> Path:
        return self.root / re.sub(r"[^\w.-]", "_", stage)

    def latest_checkpoint(self, stage: str) -> Path | None:
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return None
        found = [
            (int(match.group(1)), path)
            for path in folder.iterdir()
            if (match := _CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file()
        ]
        return max(found)[1] if found else None

    def has_checkpoints(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("*/checkpoint-*"))

    def prepare(self, train_args: TrainingArguments, stages: Sequence[str]) -> dict[str, Path | None]:
        """The checkpoint each training stage resumes from (None: from its start), checked now.

        A run that does not resume removes the checkpoints an earlier run left, so that
        checkpoints of two runs never mix.
        """
        requested = train_args.resume_from_checkpoint
        if requested is None or requested is False:
            if not self.temporary and self.has_checkpoints():
                logger.warning(
                    "removing the training checkpoints an earlier run left in %s (pass "
                    "resume_from_checkpoint=True to continue that run instead)", self.root,
                )
                shutil.rmtree(self.root, ignore_errors=True)
            return dict.fromkeys(stages)
        if train_args.resume_latest:
            if self.temporary:
                raise ArgumentError(
                    "'resume_from_checkpoint' true needs output_dir: the checkpoints save_steps "
                    "writes are kept beside it; or pass the path of a checkpoint-N folder",
                    name="resume_from_checkpoint",
                )
            points = {stage: self.latest_checkpoint(stage) for stage in stages}
            if not any(points.values()):
                raise ArgumentError(
                    f"'resume_from_checkpoint': no checkpoint to resume from in {self.root} "
                    "(a run with save_steps writes them there)",
                    name="resume_from_checkpoint",
                )
            return points
        path = Path(requested).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise ArgumentError(
                f"'resume_from_checkpoint': {path} is not a Trainer checkpoint (no "
                "trainer_state.json); pass a checkpoint-N folder, or true for the latest",
                name="resume_from_checkpoint",
            )
        if len(stages) != 1:
            raise ArgumentError(
                f"'resume_from_checkpoint': the recipe has {len(stages)} training stages; pass true "
                "to resume each from its own latest checkpoint",
                name="resume_from_checkpoint",
            )
        return {stages[0]: path}

    def close(self, *, succeeded: bool) -> None:
        """Remove the folder after a saved run; after a failed one keep what can be resumed."""
        if not succeeded and self.has_checkpoints():
            logger.warning(
                "training checkpoints kept in %s; rerun with resume_from_checkpoint=True "
                "(CLI: --resume-from-checkpoint latest) to continue", self.root,
            )
            return
        shutil.rmtree(self.root, ignore_errors=True)
