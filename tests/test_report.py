"""The run report's plot: a real PNG of per-module errors, or nothing when there is nothing to plot."""

from __future__ import annotations

import io

from llmc.report import plot_report


def test_plot_report_draws_a_png_with_one_bar_per_module():
    from matplotlib.image import imread

    rows = [{"module": f"model.layers.{i}.mlp.down_proj", "weight_error": 0.01 * (i + 1)} for i in range(6)]
    png = plot_report(rows + [{"module": "(model)", "sparsity_config": {}}], "W4A16")
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    image = imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 500  # 9 in wide at 110 dpi


def test_plot_report_without_errors_has_no_plot():
    assert plot_report([{"module": "(model)", "sparsity_config": {}}], "nothing") is None
