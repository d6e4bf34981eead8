"""The llmc plugin ``awq``: registers ``AWQModifier``, ``SmoothQuantModifier`` and the shipped
recipes ``llmc:awq_w4a16_asym`` and ``llmc:smoothquant_w8a8``.

Found by core through the entry point ``awq = "llmc_awq.plugin"`` in group ``llmc``; nothing in
core names this package.
"""

from __future__ import annotations

from pathlib import Path

from llmc import Modifier, hookimpl

RECIPES_DIR = Path(__file__).parent / "recipes"
RECIPES = {
    "awq_w4a16_asym": RECIPES_DIR / "awq_w4a16_asym.yaml",
    "smoothquant_w8a8": RECIPES_DIR / "smoothquant_w8a8.yaml",
}


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc_awq.config import AWQModifier, SmoothQuantModifier

    return [AWQModifier, SmoothQuantModifier]


@hookimpl
def llmc_register_recipes() -> dict[str, Path]:
    return dict(RECIPES)
