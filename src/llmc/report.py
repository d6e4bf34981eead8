"""The run report: what changed, per module, as JSON and as a plot.

People would rather look at per-layer error than read it, so the report gets a PNG when
matplotlib is installed (``pip install llmc-core[report]``); the JSON is always written.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from typing import Any

__all__ = ["plot_report", "report_json", "summarize_rows"]

logger = logging.getLogger("llmc.report")


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-modifier counts and the mean and worst weight error."""
    by_modifier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_modifier[row["modifier"]].append(row)
    summary = {}
    for modifier, modifier_rows in by_modifier.items():
        errors = [row["weight_error"] for row in modifier_rows if "weight_error" in row]
        summary[modifier] = {
            "modules": len(modifier_rows),
            "mean_weight_error": sum(errors) / len(errors) if errors else None,
            "max_weight_error": max(errors) if errors else None,
            "worst_module": max(modifier_rows, key=lambda r: r.get("weight_error", 0))["module"]
            if errors
            else None,
        }
    return summary


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"


def plot_report(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """A PNG of the relative weight error of every compressed module, in model order."""
    rows = [row for row in rows if "weight_error" in row]
    if not rows:
        return None
    try:
        # A bare Figure: no pyplot (a third of matplotlib's import time, and no global state
        # or GUI backend in the caller's process); savefig picks the Agg renderer for PNG.
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed; the report has no plot (pip install matplotlib)")
        return None
    names = [row["module"] for row in rows]
    errors = [row["weight_error"] for row in rows]
    height = max(3.0, 0.18 * len(rows) + 1.2)
    figure = Figure(figsize=(9, height))
    axes = figure.subplots()
    axes.barh(range(len(rows)), errors, color="#4477aa")
    axes.set_yticks(range(len(rows)), labels=names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("relative weight error  ||W - W_q|| / ||W||")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
