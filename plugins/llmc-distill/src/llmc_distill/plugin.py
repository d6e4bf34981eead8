"""The ``distill`` plugin: knowledge distillation during ``llmc train``."""

from __future__ import annotations

from llmc.hookspecs import hookimpl
from llmc.modifier import Modifier


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc_distill.modifier import OutputDistillationModifier

    return [OutputDistillationModifier]
