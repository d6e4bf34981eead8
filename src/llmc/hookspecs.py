"""The llmc plugin API: every hook a plugin or a modifier may implement.

This module is the whole contract between core and plugins, and its docstrings are its
documentation (``docs/plugins.md`` is generated from them). There are two kinds of hooks:

* **Registration hooks** (``llmc_register_*``) are implemented by a plugin *module*, the object
  named by an entry point in group ``llmc``. They are called once when the plugin manager is built
  and tell core what the plugin offers. The entry-point name (``gptq``, ``sparsity``, a third
  party's name) is the plugin's name in recipes (``gptq.GPTQModifier``) and in error messages.

* **Checkpoint hooks** (``llmc_checkpoint_config``) are implemented by plugin modules too, and
  called once when a compressed model is saved: what a plugin adds to the checkpoint's
  ``config.json`` (the sparsity plugin's ``sparsity_config``).

* **Lifecycle hooks** (``llmc_initialize`` ... ``llmc_finalize``) are implemented by the *run state*
  object a modifier returns from ``Modifier.start(context)``. One such object exists per modifier
  per run; core calls them in recipe order while it calibrates the model layer by layer.

* **Training hooks** (``llmc_train_*``) are implemented by the same run-state objects and called
  by the ``train`` entrypoint around each optimizer step, between ``llmc_initialize`` and
  ``llmc_finalize``. Training runs on ``transformers.Trainer``; the hooks fire from its callback
  events and its loss computation (``llmc.entrypoints.trainer``). A run state implements only
  the hooks it needs.

Implement a hook with the ``hookimpl`` marker exported here (or ``pluggy.HookimplMarker("llmc")``)::

    from llmc import hookimpl

    @hookimpl
    def llmc_register_modifiers():
        return [MyPruningModifier]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from llmc.context import RunContext
    from llmc.experts_adapters import ExpertsAdapter
    from llmc.modifier import Modifier

__all__ = [
    "CHECKPOINT_HOOKS",
    "LIFECYCLE_HOOKS",
    "REGISTRATION_HOOKS",
    "TRAINING_HOOKS",
    "hookimpl",
    "hookspec",
]

PROJECT = "llmc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Registration hooks: implemented by plugin modules ------------------------------------


@hookspec
def llmc_register_modifiers() -> list[type[Modifier]]:
    """Return the modifier classes this plugin provides.

    Called once per plugin when the plugin manager is built. Each class is a subclass of
    ``llmc.Modifier`` (a frozen attrs class whose fields are its recipe parameters) and carries
    its recipe name in the ``modifier_name`` class attribute (default: the class name). A plugin
    returning the same name twice is refused. Two plugins may offer the same name; recipes then
    have to say which one they mean (``gptq.GPTQModifier``).
    """


@hookspec
def llmc_register_recipes() -> dict[str, Path]:
    """Return recipes this plugin ships, as ``{short name: path of a YAML file}``.

    Users load them by ``llmc:<short name>`` (``recipe="llmc:w4a16"``), with no path. A name that
    two plugins register is refused with both owners named.
    """


@hookspec
def llmc_register_experts_adapters() -> list[type[ExpertsAdapter]]:
    """Return the experts adapters this plugin provides: how to unfuse an architecture's MoE experts.

    Called once per plugin when the plugin manager is built. Each class is a subclass of
    ``llmc.experts_adapters.ExpertsAdapter`` with its public name in ``adapter_name`` and the
    fused experts module classes it handles in ``experts_classes`` (class names, such as
    ``GptOssExperts``; none: it claims modules by structure, after every adapter naming a
    class). Its ``layout(model, name, module)`` returns an ``ExpertsLayout`` (each expert's
    gate/up/down weights and biases, the activation joining gate and up, how tokens reach the
    experts, the checkpoint names of the per-expert Linears) or a one-line reason it cannot.
    Core registers its own (``transformers``, ``gpt_oss``, ``llama4``) through this hook. An
    adapter name, or an experts class, that two plugins register is refused with both owners
    named.
    """


# --- Checkpoint hooks: implemented by plugin modules, called when a checkpoint is written -----


@hookspec
def llmc_checkpoint_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """Return entries for the checkpoint's ``quantization_config``, or None to add nothing.

    Called once per plugin when a compressed model is saved, after every stage has run, with
    the model as it will be written. The entries are merged into the compressed-tensors
    ``quantization_config`` that core builds, for example ``{"sparsity_config": {...}}``, and
    appear in the run report under ``checkpoint_config`` (a model with nothing quantized is
    saved as a plain dense checkpoint without ``quantization_config``: there, only in the
    report). Core's own keys (``config_groups``, ``format``, ``ignore``, ...)
    cannot be replaced, and a key two plugins return is refused with both named.
    """


# --- Lifecycle hooks: implemented by a modifier's run state --------------------------------


@hookspec
def llmc_initialize(context: RunContext) -> None:
    """The model is loaded and the calibration data is ready; nothing has been changed yet.

    Resolve targets, check that the modifier applies to this model (raise ``CalibrationError``
    naming the module and the fix when it does not) and allocate run state. Called once, in
    recipe order, before the first layer is calibrated.
    """


@hookspec
def llmc_layer_start(context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool | None:
    """A block (usually a decoder layer) is about to be calibrated.

    Attach forward hooks to the modules of ``layer`` whose inputs you need (to accumulate a
    Hessian or activation statistics). Return ``True`` if this modifier needs the calibration
    samples to run through ``layer`` now; when no modifier asks for them the pass is skipped.
    During the pass ``context.attention_mask`` holds the current batch's mask, so padded tokens
    can be left out of statistics.
    """


@hookspec
def llmc_layer_end(context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
    """The calibration pass over ``layer`` is done: compress it now, in place.

    Remove the hooks added in ``llmc_layer_start``, change the weights (quantize, prune), and
    record per-module results in ``context.report``. After every modifier has run this hook,
    core runs the samples through the compressed layer to produce the next layer's inputs, so
    the errors made here are seen, and compensated, by the following layers.
    """


@hookspec
def llmc_finalize(context: RunContext) -> None:
    """All blocks are done; compress whatever lies outside them and release run state.

    Modules outside the calibrated blocks (for example ``lm_head`` when it is targeted) are
    compressed here, without calibration data. Called once, in recipe order.
    """


# --- Training hooks: implemented by a modifier's run state, called by ``train`` -------------


@hookspec
def llmc_train_start(context: RunContext, optimizer: torch.optim.Optimizer) -> None:
    """Fine-tuning is about to start (after ``llmc_initialize``).

    ``optimizer`` is the Trainer's. ``context.total_steps`` and ``context.steps_per_epoch`` are
    set, and ``context.step`` is the step training starts at (not 0 when a run resumes from a
    checkpoint). Prepare what the training steps need (masks to keep, a teacher model to run,
    schedules to follow).
    """


@hookspec
def llmc_train_batch_start(context: RunContext, step: int) -> None:
    """Optimizer step ``step`` (0-based) is about to run its forward pass.

    Scheduled modifiers act here: gradual magnitude pruning raises sparsity when
    ``step / context.steps_per_epoch`` crosses its next update point.
    """


@hookspec
def llmc_train_loss(
    context: RunContext, step: int, batch: dict[str, torch.Tensor], outputs: object, loss: torch.Tensor
) -> torch.Tensor | None:
    """The student's forward pass on one micro-batch is done; return a term to *add* to ``loss``, or None.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 at padding);
    ``outputs`` is the model output (with ``logits``); ``loss`` is the task loss (the mean over
    the micro-batch's labelled tokens), the same tensor for every modifier. Every returned term
    is added to it before the backward pass (and, like it, divided by the accumulation steps).
    Distillation returns its weighted loss here. To weigh the task loss itself (distillation's
    ``orig_scale``), include ``(scale - 1) * loss`` in the term: the total is then
    ``scale * loss + ...``; such weights add up across modifiers.
    """


@hookspec
def llmc_train_after_backward(context: RunContext, step: int) -> None:
    """Gradients are computed and not yet applied: mask or clip them here.

    Called once per optimizer step, after the backward pass of its last micro-batch and before
    the Trainer clips the gradients (``max_grad_norm``). Constant pruning zeroes the gradients
    of pruned weights so the optimizer does not move them.
    """


@hookspec
def llmc_train_optimizer_step_end(context: RunContext, step: int) -> None:
    """The optimizer has updated the weights: re-apply masks or constraints here.

    Optimizers with weight decay or momentum can move a weight whose gradient is zero;
    re-applying masks here keeps pruned weights at exactly zero.
    """


@hookspec
def llmc_train_end(context: RunContext) -> None:
    """Fine-tuning finished (before ``llmc_finalize``): release training state, log results."""


REGISTRATION_HOOKS = ("llmc_register_modifiers", "llmc_register_recipes", "llmc_register_experts_adapters")
CHECKPOINT_HOOKS = ("llmc_checkpoint_config",)
LIFECYCLE_HOOKS = ("llmc_initialize", "llmc_layer_start", "llmc_layer_end", "llmc_finalize")
TRAINING_HOOKS = (
    "llmc_train_start",
    "llmc_train_batch_start",
    "llmc_train_loss",
    "llmc_train_after_backward",
    "llmc_train_optimizer_step_end",
    "llmc_train_end",
)
