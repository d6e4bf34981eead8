"""Which modules a modifier applies to.

Targets and ignore lists use the forms llm-compressor users know: a class name (``Linear``),
an exact module name (``lm_head``, ``model.layers.0.mlp.down_proj``), or a regular expression
prefixed with ``re:`` matched against the full module name (``re:.*mlp.*``).

A class name never selects a module marked as a router (``mark_router_``: the Linears that
route tokens to an MoE block's experts, such as Qwen2-MoE's ``shared_expert_gate``), so
``targets: [Linear]`` leaves routers alone as llm-compressor's MoE recipes do with ``ignore:
["re:.*mlp.gate$"]``; a module name or a regular expression still selects one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

import torch

__all__ = ["is_match", "is_router", "mark_router_", "match_modules"]

# Set on the Linears that route tokens to experts (``llmc.moe``).
ROUTER = "_llmc_router"


def mark_router_(module: torch.nn.Module) -> None:
    """Mark ``module`` as a router: class-name targets pass over it."""
    setattr(module, ROUTER, True)


def is_router(module: torch.nn.Module) -> bool:
    """Whether ``module`` was marked by ``mark_router_``."""
    return bool(getattr(module, ROUTER, False))


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches_one(name: str, module: torch.nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return _compiled(target[3:]).fullmatch(name) is not None
    if target == name:
        return True
    return target == type(module).__name__ and not is_router(module)


def is_match(name: str, module: torch.nn.Module, targets: Iterable[str]) -> bool:
    """True when ``module`` (full name ``name``) is named by any of ``targets``."""
    return any(_matches_one(name, module, target) for target in targets)


def match_modules(
    root: torch.nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    *,
    prefix: str = "",
) -> Iterator[tuple[str, torch.nn.Module]]:
    """Modules under ``root`` named by ``targets`` and not by ``ignore``, with full names.

    ``prefix`` is the name of ``root`` inside the whole model, so that names and regular
    expressions match the same way whether a modifier looks at one layer or the whole model.
    """
    for local_name, module in root.named_modules():
        name = f"{prefix}.{local_name}" if prefix and local_name else (prefix or local_name)
        if not name:
            continue
        if is_match(name, module, targets) and not is_match(name, module, ignore):
            yield name, module
