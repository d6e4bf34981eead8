"""The run report's plot: a real PNG, one panel per metric the rows carry, or nothing at all."""

from __future__ import annotations

import io

import pytest

from llmc.report import plot_report, summarize_rows


def _image(png: bytes):
    from matplotlib.image import imread

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return imread(io.BytesIO(png), format="png")


def _quantized(count: int) -> list[dict]:
    return [
        {"modifier": "GPTQModifier", "module": f"model.layers.{i}.mlp.down_proj", "weight_error": 0.01 * (i + 1),
         "output_error": 0.002 * (i + 1)}
        for i in range(count)
    ]


def test_plot_report_draws_a_png_with_a_panel_per_metric():
    pytest.importorskip("matplotlib")
    weight_only = _image(plot_report([{k: v for k, v in r.items() if k != "output_error"} for r in _quantized(6)], "t"))
    two_panels = _image(plot_report(_quantized(6), "t"))
    assert weight_only.shape[0] > 100 and weight_only.shape[1] > 500
    assert two_panels.shape[1] > weight_only.shape[1]  # a second panel makes the figure wider


def test_plot_report_shows_pruned_then_quantized_modules_with_sparsity():
    pytest.importorskip("matplotlib")
    pruned = [
        {"modifier": "SparseGPTModifier", "module": f"model.layers.{i}.mlp.up_proj", "weight_error": 0.3,
         "sparsity": 0.5, "target_sparsity": 0.5}
        for i in range(4)
    ]
    model_row = {"modifier": "SparseGPTModifier", "module": "(model)", "sparsity_config": {"format": "dense"}}
    image = _image(plot_report(pruned + _quantized(4) + [model_row], "t"))
    assert image.shape[1] > 1000  # three panels: weight error, output error, sparsity


def test_plot_report_without_numbers_has_no_plot():
    assert plot_report([{"modifier": "m", "module": "(model)", "sparsity_config": {}}], "nothing") is None


def test_summary_counts_each_module_once():
    rows = [
        {"modifier": "M", "module": "a", "weight_error": 0.1},
        {"modifier": "M", "module": "a", "weight_error": 0.3},  # reported again (a later step)
        {"modifier": "M", "module": "b", "weight_error": 0.2},
    ]
    assert summarize_rows(rows)["M"]["modules"] == 2


def test_report_plot_collapses_experts_into_one_bar_per_projection():
    from llmc.report import _experts_collapsed

    rows = [
        {"module": f"model.layers.0.mlp.experts.{e}.down_proj", "modifier": "GPTQModifier", "weight_error": 0.1 * (e + 1)}
        for e in range(4)
    ] + [{"module": "model.layers.0.self_attn.q_proj", "modifier": "GPTQModifier", "weight_error": 0.5}]
    collapsed = _experts_collapsed(rows)
    assert [row["module"] for row in collapsed] == [
        "model.layers.0.mlp.experts.*.down_proj (mean of 4)", "model.layers.0.self_attn.q_proj",
    ]
    assert collapsed[0]["weight_error"] == pytest.approx(0.25)
