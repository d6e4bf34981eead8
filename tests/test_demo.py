"""``llmc demo``: one row per kind of compression, and with core alone the rows core can make."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmc.cli import main
from llmc.demo import DEMO_RECIPES, run_demo, skipped_line, split_available
from llmc.plugins import load_registry

FAST = ("--num-calibration-samples", "4", "--max-chunks", "1")
ALL_LABELS = ["FP32 (uncompressed)", "RTN W4A16", "GPTQ W4A16", "RTN W8A8", "SparseGPT 2:4"]
CORE_LABELS = ["FP32 (uncompressed)", "RTN W4A16", "RTN W8A8"]
CORE_ONLY_LINE = (
    "skipped GPTQ W4A16, SparseGPT 2:4 (plugins not installed); "
    "to add them: pip install llmc-gptq llmc-sparsity"
)


def _table_labels(out: str) -> list[str]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    labels = []
    for line in lines[header + 1 :]:
        if "MB" not in line:
            break
        labels.append(line[:21].strip())
    return labels


def test_demo_split_available_with_core_alone_names_the_packages() -> None:
    available, skipped = split_available(DEMO_RECIPES, load_registry(entry_points=[]))
    assert [r.recipe for r in available] == ["w4a16", "w8a8"]
    assert skipped_line(skipped) == CORE_ONLY_LINE


def test_demo_with_core_alone_prints_core_rows_and_one_line_on_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMC_DISABLE_PLUGINS", "all")
    rows = run_demo(tmp_path, num_calibration_samples=4, max_chunks=1)
    out = capsys.readouterr().out
    assert [row.label for row in rows] == CORE_LABELS == _table_labels(out)
    assert [line for line in out.splitlines() if "skipped" in line] == [CORE_ONLY_LINE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4a16", "w8a8"]


@pytest.mark.skipif(
    not {"gptq", "sparsity"} <= set(load_registry().plugin_names),
    reason="needs the first-party plugins llmc-gptq and llmc-sparsity installed",
)
def test_demo_cli_shows_every_kind_of_compression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--output-dir", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert _table_labels(out) == ALL_LABELS
    assert "skipped" not in out
    for recipe in ("w4a16", "gptq_w4a16", "w8a8", "sparsegpt_2of4"):
        assert (tmp_path / recipe / "model.safetensors").is_file()
    header = next(line for line in out.splitlines() if line.startswith("model "))
    rows = out.splitlines()[out.splitlines().index(header) + 1 :][: len(ALL_LABELS)]
    perplexities = {row[:21].strip(): float(row[39:51]) for row in rows}
    assert all(math.isfinite(value) and value > 1 for value in perplexities.values())
    assert perplexities["GPTQ W4A16"] < perplexities["RTN W4A16"]
