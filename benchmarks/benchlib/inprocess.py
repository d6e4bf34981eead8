"""A B A B inside one process: steps that share loaded inputs, timed in alternation.

For what a separate process per run would drown in start-up cost (one solve, one pipeline on
already loaded batches). Each step runs after waiting for an idle machine, so that a round
disturbed by another process shows in ``busy_before`` instead of only in the seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from benchlib.env import load_average
from benchlib.measure import wait_until_idle

__all__ = ["alternate", "medians"]


def alternate(
    rounds: int, steps: Mapping[str, Callable[[], Any]], *, idle_wait_s: float
) -> list[dict[str, dict[str, Any]]]:
    """Run every step once per round, in order; one ``{step: {seconds, value, busy_before, load_before}}`` per round.

    ``value`` is what the step returned (a step that times only part of its work returns its
    own figure there).
    """
    out = []
    for _ in range(rounds):
        row = {}
        for name, step in steps.items():
            busy = wait_until_idle(idle_wait_s)
            load = load_average()
            started = time.perf_counter()
            value = step()
            seconds = time.perf_counter() - started
            row[name] = {
                "seconds": seconds,
                "value": value,
                "busy_before": busy,
                "load_before": load,
            }
        out.append(row)
    return out


def medians(rounds: list[dict[str, dict[str, Any]]], key: str = "seconds") -> dict[str, float]:
    """The median of ``key`` per step over ``rounds``."""
    return (
        {name: statistics.median(row[name][key] for row in rounds) for name in rounds[0]}
        if rounds
        else {}
    )
