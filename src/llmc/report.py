"""The run report: what changed, per module, as JSON and as a plot.

People would rather look at per-layer error than read it, so the report gets a PNG when
matplotlib is installed (``pip install llmc-core[report]``); the JSON is always written.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections import defaultdict
from typing import Any

import torch

__all__ = [
    "expert_summary",
    "expert_tokens",
    "plot_expert_tokens",
    "plot_report",
    "relative_error",
    "report_json",
    "summarize_rows",
]

logger = logging.getLogger("llmc.report")


def relative_error(original: torch.Tensor, changed: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F: how much of the weight a compression step changed (the report's
    ``weight_error``, the same measure for every modifier)."""
    # by pieces of rows, summed in float64: whole-weight float copies of a 14336-wide weight
    # would be the largest allocation of an RTN run
    original = original.detach().reshape(original.shape[0], -1)
    changed = changed.detach().reshape(original.shape[0], -1)
    step = max(1, (1 << 22) // max(1, original.shape[1]))
    total = difference = 0.0
    for start in range(0, original.shape[0], step):
        piece = original[start : start + step].float()
        total += float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2
        difference += float(torch.linalg.vector_norm(piece - changed[start : start + step].float(), dtype=torch.float64)) ** 2
    return math.sqrt(difference) / (math.sqrt(total) or 1.0)


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per modifier: how many distinct modules it changed, and the mean and worst weight error."""
    by_modifier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_modifier[row["modifier"]].append(row)
    summary = {}
    for modifier, modifier_rows in by_modifier.items():
        errors = [row["weight_error"] for row in modifier_rows if "weight_error" in row]
        summary[modifier] = {
            "modules": len({row["module"] for row in modifier_rows}),
            "mean_weight_error": sum(errors) / len(errors) if errors else None,
            "max_weight_error": max(errors) if errors else None,
            "worst_module": max(modifier_rows, key=lambda r: r.get("weight_error", 0))["module"]
            if errors
            else None,
        }
    return summary


def report_json(report: dict[str, Any]) -> str:
    """The report as the text of ``llmc_report.json`` (anything not JSON-native as its str)."""
    return json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"


# (row key, axis label): one panel per metric some row carries, modules down the shared y axis.
PLOTTED_METRICS = (
    ("weight_error", "relative weight error ‖W − W′‖ / ‖W‖"),
    ("output_error", "relative output error (calibration data)"),
    ("sparsity", "sparsity reached (| = target)"),
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expert_tokens(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Calibration tokens routed to each expert, per MoE block: ``{block: [tokens of expert 0,
    1, ...]}`` from the rows' ``routed_tokens`` (module names ``<block>.<expert>.<projection>``).

    These are the tokens the router chose, also when every expert was calibrated on all tokens:
    an expert at 0 is one the calibration data never reaches in use.
    """
    found: dict[str, dict[int, int]] = defaultdict(dict)
    for row in rows:
        tokens = row.get("routed_tokens")
        if not _number(tokens):
            continue
        block, _, local = row["module"].rpartition(".")  # drop the projection
        block, _, expert = block.rpartition(".")
        if expert.isdigit():
            found[block][int(expert)] = int(tokens)
    return {
        block: [per_expert.get(e, 0) for e in range(max(per_expert) + 1)]
        for block, per_expert in found.items()
    }


def expert_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's MoE entries: ``routed_tokens`` per block and the experts the router never
    chose (``experts_without_routed_tokens``); empty for a model without experts."""
    per_block = expert_tokens(rows)
    if not per_block:
        return {}
    starved = {block: [e for e, n in enumerate(tokens) if n == 0] for block, tokens in per_block.items()}
    return {
        "routed_tokens": per_block,
        "experts_without_routed_tokens": {block: ids for block, ids in starved.items() if ids},
    }


def plot_expert_tokens(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """A PNG heatmap of routed calibration tokens, MoE blocks down, experts across (zeros
    marked), or None without MoE rows or matplotlib."""
    per_block = expert_tokens(rows)
    if not per_block:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    blocks = list(per_block)
    experts = max(len(tokens) for tokens in per_block.values())
    grid = [tokens + [0] * (experts - len(tokens)) for tokens in per_block.values()]
    figure = Figure(figsize=(min(24.0, 3.0 + 0.12 * experts), 1.6 + 0.3 * len(blocks)))
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    starved = [(e, b) for b, tokens in enumerate(grid) for e, count in enumerate(tokens) if count == 0]
    if starved:
        axes.scatter([e for e, _ in starved], [b for _, b in starved], marker="x", color="#cc3311", s=12)
    axes.set_yticks(range(len(blocks)), labels=blocks, fontsize=7)
    axes.set_xlabel(f"expert ({len(starved)} of {experts * len(blocks)} got no routed token: x)", fontsize=8)
    figure.colorbar(image, ax=axes, label="calibration tokens routed")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _experts_collapsed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per MoE projection and layer (``...experts.*.down_proj``), each metric the mean
    over the experts: hundreds of experts per layer would make a chart thousands of bars tall
    (the JSON keeps every expert's row)."""
    merged: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        key = (_EXPERT_INDEX.sub(".experts.*.", row["module"]), row.get("modifier"))
        merged.setdefault(key, []).append(row)
    collapsed = []
    for (module, modifier), group in merged.items():
        if len(group) == 1:
            collapsed.append(group[0])
            continue
        row = {"module": f"{module} (mean of {len(group)})", "modifier": modifier}
        for key in (*(k for k, _ in PLOTTED_METRICS), "target_sparsity"):
            values = [r[key] for r in group if _number(r.get(key))]
            if values:
                row[key] = sum(values) / len(values)
        collapsed.append(row)
    return collapsed


def plot_report(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """A PNG with one bar chart per metric the rows carry (weight error, GPTQ's output error,
    sparsity reached against its target), every compressed module in model order (MoE experts
    as one bar per projection and layer)."""
    rows = [row for row in rows if any(_number(row.get(key)) for key, _ in PLOTTED_METRICS)]
    rows = _experts_collapsed(rows)
    if not rows:
        return None
    try:
        # A bare Figure: no pyplot (a third of matplotlib's import time, and no global state
        # or GUI backend in the caller's process); savefig picks the Agg renderer for PNG.
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed; the report has no plot (pip install matplotlib)")
        return None
    metrics = [(key, label) for key, label in PLOTTED_METRICS if any(_number(row.get(key)) for row in rows)]
    several_modifiers = len({row.get("modifier") for row in rows}) > 1
    names = [f"{row['module']} ({row['modifier']})" if several_modifiers else row["module"] for row in rows]
    positions = range(len(rows))
    height = max(3.0, 0.18 * len(rows) + 1.2)
    figure = Figure(figsize=(4.5 + 3.5 * len(metrics), height))
    panels = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for axes, (key, label) in zip(panels, metrics):
        values = [row[key] if _number(row.get(key)) else float("nan") for row in rows]
        axes.barh(positions, values, color="#4477aa")
        if key == "sparsity":
            targets = [row.get("target_sparsity") for row in rows]
            marked = [(t, y) for y, t in zip(positions, targets) if _number(t)]
            if marked:
                axes.scatter([t for t, _ in marked], [y for _, y in marked], marker="|", color="#cc3311", s=60)
            axes.set_xlim(0, 1)
        axes.set_xlabel(label, fontsize=8)
        axes.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(list(positions), labels=names, fontsize=7)
    panels[0].invert_yaxis()
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
