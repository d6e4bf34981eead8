"""The base class of recipe modifiers.

A modifier is configuration only: a frozen attrs class whose fields are the parameters a recipe
gives it, so that recipes can be validated, overridden, saved and compared without touching a
model. Everything that changes during a run (Hessians, statistics, masks) lives in the run-state
object that ``start`` returns; that object implements the lifecycle hooks of ``llmc.hookspecs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from llmc.context import RunContext

__all__ = ["Modifier"]


@attrs.frozen(kw_only=True)
class Modifier:
    """Subclass with ``@attrs.frozen(kw_only=True)`` and declare the recipe parameters as fields.

    Class attributes a subclass may set:

    * ``modifier_name``: the name recipes use (default: the class name).
    * ``requires_calibration_data``: ``False`` for data-free methods (round-to-nearest,
      magnitude pruning), so ``oneshot`` can run without a dataset.
    * ``supports_oneshot`` / ``supports_training``: in which kind of stage the modifier can run
      (a one-shot calibration pass, or fine-tuning with the ``llmc_train_*`` hooks).
    """

    modifier_name: ClassVar[str | None] = None
    requires_calibration_data: ClassVar[bool] = True
    supports_oneshot: ClassVar[bool] = True
    supports_training: ClassVar[bool] = False

    def start(self, context: RunContext) -> Any:
        """Create this modifier's run state: an object implementing lifecycle hooks."""
        raise NotImplementedError(f"{type(self).__name__} must implement start(context)")

    @classmethod
    def recipe_name(cls) -> str:
        return cls.modifier_name or cls.__name__
