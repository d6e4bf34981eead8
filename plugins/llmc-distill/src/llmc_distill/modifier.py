"""``OutputDistillationModifier``: fine-tune a compressed model towards its teacher's outputs."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from llmc.context import RunContext
from llmc.errors import ArgumentError, CalibrationError
from llmc.modifier import RunState, TargetedModifier
from llmc.targets import match_modules
from llmc.validators import OneOf, as_list, is_number_in, is_target_list
from llmc_distill.losses import COMPARISONS

__all__ = ["DistillationRun", "OutputDistillationModifier"]

logger = logging.getLogger("llmc_distill")

LOGITS = "logits"


def _optional_targets(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        is_target_list(instance, attribute, value)


@attrs.frozen(kw_only=True)
class OutputDistillationModifier(TargetedModifier):
    """Knowledge distillation during ``train``: the loss becomes
    ``orig_scale · task loss + distill_scale · Σ_targets comparison(student, teacher)``.

    The teacher is ``distill_teacher`` (a path, a hub name, a loaded model, or ``"self"``: a
    frozen copy of the model before the recipe's first stage, so a pruned or quantized model
    learns back what it lost). It runs under ``no_grad`` in eval mode, on
    ``distill_teacher_device`` (default: the student's). Without ``targets`` the logits are
    compared; with ``targets`` (module names, class names, ``re:`` patterns; minus ``ignore``)
    the outputs of those modules, which must exist under the same names in the teacher.
    ``comparison``: ``kl_divergence`` (softened by ``temperature``, arXiv 1503.02531),
    ``square_head`` (MSE normalised by the teacher's energy, arXiv 2310.06927), ``mse``,
    ``cosine_similarity`` (minimised as 1 − cos). Padded tokens are left out. Training only.
    """

    supports_training = True
    supports_oneshot = False
    requires_calibration_data = False
    requires_teacher = True

    targets: list[str] | None = attrs.field(default=None, converter=as_list, validator=_optional_targets)
    ignore: list[str] = attrs.field(factory=list, converter=as_list, validator=is_target_list)
    comparison: str = attrs.field(default="kl_divergence", validator=OneOf(tuple(COMPARISONS)))
    temperature: float = attrs.field(default=1.0, validator=is_number_in(0, low_open=True))
    orig_scale: float = attrs.field(default=1.0, validator=is_number_in(0))
    distill_scale: float = attrs.field(default=1.0, validator=is_number_in(0))

    def start(self, context: RunContext) -> DistillationRun:
        return DistillationRun(config=self)


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor (decoder layers of some transformers versions return tuples)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise CalibrationError(f"cannot compare a module output of type {type(output).__name__}")
    return output


@attrs.define
class DistillationRun(RunState):
    """Run state: the teacher while training runs, the hooks that catch both models' outputs."""

    config: OutputDistillationModifier
    names: list[str] = attrs.field(factory=list)
    teacher: torch.nn.Module | None = None
    teacher_device: torch.device | None = None
    teacher_bytes: int = 0
    student_outputs: dict[str, torch.Tensor] = attrs.field(factory=dict)
    teacher_outputs: dict[str, torch.Tensor] = attrs.field(factory=dict)
    handles: list[Any] = attrs.field(factory=list)
    distill_losses: list[float] = attrs.field(factory=list)

    @property
    def name(self) -> str:
        return type(self.config).recipe_name()

    def llmc_initialize(self, context: RunContext) -> None:
        if self.config.targets is None:
            self.names = []
            return
        self.names = [name for name, _ in match_modules(context.model, self.config.targets, self.config.ignore)]
        if not self.names:
            raise CalibrationError(
                f"{self.name}: no module matches targets {self.config.targets} (minus ignore "
                f"{self.config.ignore}); name modules such as 're:.*layers\\.\\d+$', or leave targets "
                "out to compare the logits"
            )

    def llmc_train_start(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        if context.teacher is None:
            raise ArgumentError(
                f"{self.name} needs a teacher model: pass distill_teacher=... (a path, a hub name, "
                "a loaded model, or 'self')",
                name="distill_teacher",
            )
        teacher = context.teacher()
        if teacher is context.model:
            raise ArgumentError(
                "distill_teacher is the model being trained; pass 'self' for a frozen copy of it",
                name="distill_teacher",
            )
        self._check_compatible(context.model, teacher)
        self.teacher = teacher
        self.teacher_device = next(teacher.parameters()).device
        self.teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        logger.info(
            "%s: teacher %s on %s, %.1f MiB of parameters; comparing %s by %s", self.name,
            type(teacher).__name__, self.teacher_device, self.teacher_bytes / 2**20,
            ", ".join(self.names) or LOGITS, self.config.comparison,
        )
        for name in self.names:
            self.handles.append(context.model.get_submodule(name).register_forward_hook(self._catch(self.student_outputs, name)))
            self.handles.append(teacher.get_submodule(name).register_forward_hook(self._catch(self.teacher_outputs, name)))

    def _check_compatible(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        student_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
        teacher_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
        if not self.names and student_vocab and teacher_vocab and student_vocab != teacher_vocab:
            raise ArgumentError(
                f"distill_teacher has a vocabulary of {teacher_vocab} tokens and the model {student_vocab}; "
                "comparing logits needs the same tokenizer",
                name="distill_teacher",
            )
        teacher_names = {name for name, _ in teacher.named_modules()}
        missing = [name for name in self.names if name not in teacher_names]
        if missing:
            raise ArgumentError(
                f"{self.name}: the teacher has no module {missing[0]!r} ({len(missing)} of "
                f"{len(self.names)} targets missing); layer-wise targets need the same module names "
                "in both models",
                name="distill_teacher",
            )

    @staticmethod
    def _catch(store: dict[str, torch.Tensor], name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            store[name] = _first_tensor(output)

        return hook

    def llmc_train_loss(
        self, context: RunContext, step: int, batch: dict, outputs: object, loss: torch.Tensor
    ) -> torch.Tensor | None:
        config = self.config
        inputs = {key: batch[key].to(self.teacher_device) for key in ("input_ids", "attention_mask") if key in batch}
        with torch.no_grad():
            teacher_outputs = self.teacher(**inputs)
        if self.names:
            pairs = [(self.student_outputs.pop(n), self.teacher_outputs.pop(n)) for n in self.names]
        else:
            pairs = [(outputs.logits, teacher_outputs.logits)]
        compare = COMPARISONS[config.comparison]
        extra = {"temperature": config.temperature} if config.comparison == "kl_divergence" else {}
        mask = batch.get("attention_mask")
        distill = loss.new_zeros(())
        for student, teacher in pairs:
            teacher = teacher.to(student.device)
            if student.shape != teacher.shape:
                raise CalibrationError(
                    f"{self.name}: student output {tuple(student.shape)} and teacher output "
                    f"{tuple(teacher.shape)} differ in shape; compare modules of the same width"
                )
            token_mask = mask if mask is not None and tuple(mask.shape) == tuple(student.shape[:-1]) else None
            distill = distill + compare(student, teacher, mask=token_mask, **extra)
        self.distill_losses.append(float(distill.detach()))
        # Terms add to the task loss: (orig_scale - 1) · loss makes it orig_scale · loss.
        return (config.orig_scale - 1.0) * loss + config.distill_scale * distill

    def llmc_train_end(self, context: RunContext) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.student_outputs.clear()
        self.teacher_outputs.clear()
        losses = self.distill_losses
        context.record(
            modifier=self.name,
            module="(teacher)",
            comparison=self.config.comparison,
            targets=self.names or [LOGITS],
            teacher_device=str(self.teacher_device),
            teacher_parameter_bytes=self.teacher_bytes,
            first_distill_loss=losses[0] if losses else None,
            last_distill_loss=losses[-1] if losses else None,
            distill_losses=list(losses),
        )
        self.teacher = None  # released: core holds "self" copies only while a stage needs them
