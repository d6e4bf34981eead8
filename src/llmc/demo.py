"""``llmc demo``: compress the embedded tiny Llama and show what changed.

Runs anywhere (no hub): the model and the held-out text ship with llmc. For each recipe it
prints the checkpoint size, the held-out perplexity of the compressed model (reloaded through
transformers + compressed-tensors when that package is installed, the independent check that
the checkpoint is right) and the time taken.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import attrs

from llmc.entrypoints.oneshot import oneshot
from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity
from llmc.models import resolve_model_path

__all__ = ["DemoRow", "run_demo"]

logger = logging.getLogger("llmc.demo")

EMBEDDED_MODEL = "llmc:tiny-llama"
DEMO_RECIPES = ("w4a16", "w8a8")


@attrs.frozen
class DemoRow:
    label: str
    size_bytes: int
    perplexity: float
    seconds: float
    reloaded: bool


def _safetensors_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def run_demo(
    output_dir: str | Path = "llmc-demo",
    *,
    num_calibration_samples: int = 64,
    max_chunks: int = 64,
    recipes: tuple[str, ...] = DEMO_RECIPES,
) -> list[DemoRow]:
    """Compress the embedded model with each recipe; print and return one row per model."""
    output_dir = Path(output_dir)
    model_dir = Path(resolve_model_path(EMBEDDED_MODEL))
    can_reload = importlib.util.find_spec("compressed_tensors") is not None

    started = time.perf_counter()
    model, tokenizer = load_model_for_eval(str(model_dir), precision="float32")
    tokens = heldout_token_ids(tokenizer)
    rows = [
        DemoRow(
            label="FP32 (original)",
            size_bytes=_safetensors_bytes(model_dir),
            perplexity=perplexity(model, tokens, max_chunks=max_chunks),
            seconds=time.perf_counter() - started,
            reloaded=True,
        )
    ]
    for recipe in recipes:
        started = time.perf_counter()
        result = oneshot(
            model=str(model_dir),
            recipe=f"llmc:{recipe}",
            dataset="llmc:stdlib-docs",
            num_calibration_samples=num_calibration_samples,
            precision="float32",
            output_dir=str(output_dir / recipe),
            overwrite=True,
        )
        compress_seconds = time.perf_counter() - started
        checked_model = result.model
        if can_reload:
            checked_model, _ = load_model_for_eval(str(result.output_dir), precision="float32")
        rows.append(
            DemoRow(
                label=f"{recipe.upper()} RTN",
                size_bytes=_safetensors_bytes(result.output_dir),
                perplexity=perplexity(checked_model, tokens, max_chunks=max_chunks),
                seconds=compress_seconds,
                reloaded=can_reload,
            )
        )
    chunks = min(max_chunks, max(1, (len(tokens) - 1) // 512 + 1))
    _print_table(rows, chunks=chunks, output_dir=output_dir)
    return rows


def _print_table(rows: list[DemoRow], *, chunks: int, output_dir: Path) -> None:
    base = rows[0]
    print()
    print(f"embedded tiny Llama, held-out perplexity on {chunks} chunks of 512 tokens of unseen stdlib docstrings")
    print(f"{'model':<18}{'size':>10}{'ratio':>8}{'perplexity':>12}{'delta':>9}{'time':>9}")
    for row in rows:
        ratio = base.size_bytes / row.size_bytes if row.size_bytes else float("nan")
        delta = row.perplexity - base.perplexity
        print(
            f"{row.label:<18}{row.size_bytes / 1e6:>8.2f}MB{ratio:>7.2f}x{row.perplexity:>12.3f}"
            f"{delta:>+9.3f}{row.seconds:>8.1f}s"
        )
    if not all(row.reloaded for row in rows):
        print("(perplexity of the in-memory model: install compressed-tensors to check the saved files)")
    print(f"checkpoints in {output_dir}/")
