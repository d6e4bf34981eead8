"""The llmc plugin ``gptq``: registers ``GPTQModifier`` and the shipped recipe ``llmc:gptq_w4a16``.

Found by core through the entry point ``gptq = "llmc_gptq.plugin"`` in group ``llmc``; nothing in
core names this package.
"""

from __future__ import annotations

from pathlib import Path

from llmc import Modifier, hookimpl

RECIPES_DIR = Path(__file__).parent / "recipes"
RECIPES = {"gptq_w4a16": RECIPES_DIR / "w4a16_gptq.yaml"}


@hookimpl
def llmc_register_modifiers() -> list[type[Modifier]]:
    from llmc_gptq.config import GPTQModifier

    return [GPTQModifier]


@hookimpl
def llmc_register_recipes() -> dict[str, Path]:
    return dict(RECIPES)
