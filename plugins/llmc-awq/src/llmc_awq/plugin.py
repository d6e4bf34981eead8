"""The llmc plugin ``awq``: registers ``AWQModifier`` and ``SmoothQuantModifier``.

Found by core through the entry point ``awq = "llmc_awq.plugin"`` in group ``llmc``; nothing in
core names this package.
"""

from __future__ import annotations

from llmc import Modifier, hookimpl


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc_awq.config import AWQModifier, SmoothQuantModifier

    return [AWQModifier, SmoothQuantModifier]
