"""``llmc demo``: compress the embedded tiny Llama with each kind of recipe and show what changed.

Runs anywhere (no hub): the model and the held-out text ship with llmc. The rows are the
product's range, round-to-nearest and GPTQ int4 weights, int8 weights and activations, SparseGPT
2:4, each a shipped recipe run by name exactly as a user would run it. For each it prints the
checkpoint size, the held-out perplexity of the compressed model (reloaded through transformers
+ compressed-tensors when that package is installed, the independent check that the checkpoint
is right) and the time taken.

Rows whose recipe comes from a plugin are shown only when llmc's registry has that recipe, so a
user who installed only core still gets the rows core can make and one line saying what to
install for the rest.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from llmc.entrypoints.oneshot import oneshot
from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity
from llmc.models import resolve_model_path
from llmc.plugins import FIRST_PARTY_PLUGINS, Registry, load_registry

__all__ = ["DEMO_RECIPES", "DemoRecipe", "DemoRow", "run_demo", "skipped_line", "split_available"]

logger = logging.getLogger("llmc.demo")

EMBEDDED_MODEL = "llmc:tiny-llama"
FP_LABEL = "FP32 (uncompressed)"


@attrs.frozen
class DemoRecipe:
    """One compressed row: its label and the shipped recipe (and plugin) that makes it."""

    label: str
    recipe: str
    plugin: str

    @property
    def package(self) -> str:
        """What to ``pip install`` for this row when its plugin is missing."""
        return FIRST_PARTY_PLUGINS.get(self.plugin, self.plugin)


DEMO_RECIPES = (
    DemoRecipe("RTN W4A16", "w4a16", "core"),
    DemoRecipe("GPTQ W4A16", "gptq_w4a16", "gptq"),
    DemoRecipe("RTN W8A8", "w8a8", "core"),
    DemoRecipe("SparseGPT 2:4", "sparsegpt_2of4", "sparsity"),
)


@attrs.frozen
class DemoRow:
    """One printed row, returned too so that callers and tests need not parse the table."""

    label: str
    size_bytes: int
    perplexity: float
    seconds: float
    reloaded: bool


def split_available(
    recipes: Sequence[DemoRecipe], registry: Registry
) -> tuple[list[DemoRecipe], list[DemoRecipe]]:
    """The recipes the installed plugins ship, and those whose plugin is missing.

    Asked of the registry rather than by importing plugin modules: a row runs exactly when
    ``llmc:<recipe>`` would resolve for the user, and a recipe of that name from another plugin
    does not count, since the row's label describes the first-party one.
    """
    available = [r for r in recipes if registry.recipes.get(r.recipe, ("",))[0] == r.plugin]
    return available, [r for r in recipes if r not in available]


def skipped_line(skipped: Sequence[DemoRecipe]) -> str:
    """One line naming the rows left out and the packages that would add them."""
    labels = ", ".join(r.label for r in skipped)
    packages = " ".join(dict.fromkeys(r.package for r in skipped))
    return f"skipped {labels} (plugins not installed); to add them: pip install {packages}"


def _safetensors_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def run_demo(
    output_dir: str | Path = "llmc-demo",
    *,
    num_calibration_samples: int = 64,
    max_chunks: int = 64,
    recipes: Sequence[DemoRecipe] = DEMO_RECIPES,
) -> list[DemoRow]:
    """Compress the embedded model with each available recipe; print and return one row per model.

    The first row is the uncompressed model; checkpoints go to ``output_dir/<recipe>``.
    """
    output_dir = Path(output_dir)
    model_dir = Path(resolve_model_path(EMBEDDED_MODEL))
    can_reload = importlib.util.find_spec("compressed_tensors") is not None
    available, skipped = split_available(recipes, load_registry())

    started = time.perf_counter()
    model, tokenizer = load_model_for_eval(str(model_dir), precision="float32")
    tokens = heldout_token_ids(tokenizer)
    rows = [
        DemoRow(
            label=FP_LABEL,
            size_bytes=_safetensors_bytes(model_dir),
            perplexity=perplexity(model, tokens, max_chunks=max_chunks),
            seconds=time.perf_counter() - started,
            reloaded=True,
        )
    ]
    for demo_recipe in available:
        started = time.perf_counter()
        result = oneshot(
            model=str(model_dir),
            recipe=f"llmc:{demo_recipe.recipe}",
            dataset="llmc:stdlib-docs",
            num_calibration_samples=num_calibration_samples,
            precision="float32",
            output_dir=str(output_dir / demo_recipe.recipe),
            overwrite=True,
        )
        compress_seconds = time.perf_counter() - started
        checked_model = result.model
        if can_reload:
            checked_model, _ = load_model_for_eval(str(result.output_dir), precision="float32")
        rows.append(
            DemoRow(
                label=demo_recipe.label,
                size_bytes=_safetensors_bytes(result.output_dir),
                perplexity=perplexity(checked_model, tokens, max_chunks=max_chunks),
                seconds=compress_seconds,
                reloaded=can_reload,
            )
        )
    chunks = min(max_chunks, max(1, (len(tokens) - 1) // 512 + 1))
    _print_table(rows, chunks=chunks, output_dir=output_dir, skipped=skipped)
    return rows


def _print_table(
    rows: list[DemoRow], *, chunks: int, output_dir: Path, skipped: Sequence[DemoRecipe]
) -> None:
    base = rows[0]
    print()
    print(
        f"embedded tiny Llama, held-out perplexity on {chunks} chunks of 512 tokens "
        "of unseen stdlib docstrings"
    )
    print(f"{'model':<21}{'size':>10}{'ratio':>8}{'perplexity':>12}{'delta':>9}{'time':>9}")
    for row in rows:
        ratio = base.size_bytes / row.size_bytes if row.size_bytes else float("nan")
        delta = row.perplexity - base.perplexity
        print(
            f"{row.label:<21}{row.size_bytes / 1e6:>8.2f}MB{ratio:>7.2f}x{row.perplexity:>12.3f}"
            f"{delta:>+9.3f}{row.seconds:>8.1f}s"
        )
    if not all(row.reloaded for row in rows):
        print(
            "(perplexity of the in-memory model: install compressed-tensors to check the "
            "saved files)"
        )
    if skipped:
        print(skipped_line(skipped))
    print(f"checkpoints in {output_dir}/")
