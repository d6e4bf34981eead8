"""The base classes of recipe modifiers and of their run states.

A modifier is configuration only: a frozen attrs class whose fields are the parameters a recipe
gives it, so that recipes can be validated, overridden, saved and compared without touching a
model. Everything that changes during a run (Hessians, statistics, masks) lives in the run-state
object that ``start`` returns; that object implements the lifecycle hooks of ``llmc.hookspecs``.

* ``Modifier``: the root; ``TargetedModifier`` adds the ``targets``/``ignore`` fields every
  modifier that acts on Linears shares (validated the same way everywhere).
* ``RunState``: the base of run states, with every lifecycle and training hook as a no-op, so
  a run state overrides only the hooks it needs. An override needs no ``@hookimpl`` marker,
  and a method whose name starts with ``llmc_`` but is no hook (``llmc_layer_strat``) is an
  error when the class is defined, naming the closest hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from llmc.errors import ArgumentError, PluginError, did_you_mean
from llmc.hookspecs import LIFECYCLE_HOOKS, TRAINING_HOOKS, hookimpl
from llmc.validators import as_list, is_target_list

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from llmc.context import RunContext

__all__ = ["Modifier", "RunState", "TargetedModifier"]

RUN_STATE_HOOKS = LIFECYCLE_HOOKS + TRAINING_HOOKS


class RunState:
    """Base of a modifier's run state: the hooks of ``llmc.hookspecs``, each doing nothing.

    Subclasses (plain or attrs classes) override the hooks they need; overriding methods are
    marked as hook implementations automatically. Keep per-run mutable state here, never on the
    modifier (the configuration).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if not name.startswith("llmc_") or not callable(value):
                continue
            if name not in RUN_STATE_HOOKS:
                raise PluginError(
                    f"{cls.__qualname__}.{name} is not an llmc hook"
                    f"{did_you_mean(name, RUN_STATE_HOOKS)}"
                )
            if not hasattr(value, "llmc_impl"):
                hookimpl(value)

    @hookimpl
    def llmc_initialize(self, context: RunContext) -> None:
        return None

    @hookimpl
    def llmc_layer_start(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool | None:
        return None

    @hookimpl
    def llmc_layer_end(self, context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
        return None

    @hookimpl
    def llmc_finalize(self, context: RunContext) -> None:
        return None

    @hookimpl
    def llmc_train_start(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        return None

    @hookimpl
    def llmc_train_batch_start(self, context: RunContext, step: int) -> None:
        return None

    @hookimpl
    def llmc_train_loss(
        self, context: RunContext, step: int, batch: dict, outputs: object, loss: torch.Tensor
    ) -> torch.Tensor | None:
        return None

    @hookimpl
    def llmc_train_after_backward(self, context: RunContext, step: int) -> None:
        return None

    @hookimpl
    def llmc_train_optimizer_step_end(self, context: RunContext, step: int) -> None:
        return None

    @hookimpl
    def llmc_train_end(self, context: RunContext) -> None:
        return None


@attrs.frozen(kw_only=True)
class Modifier:
    """Subclass with ``@attrs.frozen(kw_only=True)`` and declare the recipe parameters as fields.

    Validate fields with ``attrs.validators`` or ``llmc.validators`` (they raise
    ``ArgumentError``, which recipes report with the parameter's path and line); a check that
    spans several fields goes in ``__attrs_post_init__``. Class attributes a subclass may set:

    * ``modifier_name``: the name recipes use (default: the class name).
    * ``requires_calibration_data``: ``False`` for data-free methods (round-to-nearest,
      magnitude pruning), so ``oneshot`` can run without a dataset.
    * ``supports_oneshot`` / ``supports_training``: in which kind of stage the modifier can run
      (a one-shot calibration pass, or fine-tuning with the ``llmc_train_*`` hooks).
    * ``requires_teacher``: ``True`` for distillation: ``train`` refuses to start without the
      ``distill_teacher`` argument, and ``context.teacher()`` returns the teacher model.
    """

    modifier_name: ClassVar[str | None] = None
    requires_calibration_data: ClassVar[bool] = True
    supports_oneshot: ClassVar[bool] = True
    supports_training: ClassVar[bool] = False
    requires_teacher: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Modifier:
        # attrs' generated __init__ would say only "unexpected keyword argument"; a mistyped
        # parameter from Python deserves the closest name, as recipes get.
        if attrs.has(cls):
            names = [field.alias for field in attrs.fields(cls) if field.init]
            for key in kwargs:
                if key not in names:
                    raise ArgumentError(
                        f"{cls.recipe_name()} has no parameter {key!r}{did_you_mean(key, names)}",
                        name=key,
                    )
        return super().__new__(cls)

    def check_stage(self, stage: Sequence[Modifier]) -> None:
        """Refuse a stage this modifier cannot work in; called before the model is loaded.

        ``stage`` is every modifier of the stage, in recipe order, this one included (the
        same tuple ``context.stage_modifiers`` holds while the stage runs). Raise
        ``RecipeError`` saying what is missing; the default accepts any stage. A modifier that
        takes settings from a sibling (``AWQModifier``: the scheme of the quantizer after it)
        checks here that the sibling is there.
        """
        return None

    def start(self, context: RunContext) -> RunState:
        """Create this modifier's run state (a ``RunState``) for one run."""
        raise NotImplementedError(f"{type(self).__name__} must implement start(context)")

    @classmethod
    def recipe_name(cls) -> str:
        return cls.modifier_name or cls.__name__


@attrs.frozen(kw_only=True)
class TargetedModifier(Modifier):
    """A modifier acting on a model's modules: ``targets`` minus ``ignore``.

    Both take module names, class names (``Linear``) and ``re:`` patterns (matched against full
    module names); one string is read as a one-element list.
    """

    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list, validator=is_target_list)
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=as_list, validator=is_target_list)
