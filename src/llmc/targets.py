"""Which modules a modifier applies to.

Targets and ignore lists use the forms llm-compressor users know: a class name (``Linear``),
an exact module name (``lm_head``, ``model.layers.0.mlp.down_proj``), or a regular expression
prefixed with ``re:`` matched against the full module name (``re:.*mlp.*``).

A class name never selects a module marked with ``mark_class_targets_skip_``, which records
why: ``router`` (``mark_router_``: the Linears that route tokens to an MoE block's experts, such
as Qwen2-MoE's ``shared_expert_gate`` or Llama 4's ``Llama4Router``) and ``encoder`` (the
Linears of a vision-language model outside its language model, ``llmc.multimodal``). So
``targets: [Linear]`` leaves them alone as llm-compressor's recipes do with ``ignore:
["re:.*mlp.gate$", "re:visual.*"]``; a module name or a regular expression still selects one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

import torch

__all__ = [
    "class_targets_skip",
    "is_match",
    "is_router",
    "mark_class_targets_skip_",
    "mark_router_",
    "match_modules",
]

# Set on the modules class-name targets pass over, with the reason (``router``, ``encoder``).
SKIP = "_llmc_class_targets_skip"


def mark_class_targets_skip_(module: torch.nn.Module, reason: str) -> None:
    """Mark ``module`` so that class-name targets pass over it, for ``reason``."""
    setattr(module, SKIP, reason)


def class_targets_skip(module: torch.nn.Module) -> str | None:
    """Why class-name targets pass over ``module``, or None when they do not."""
    return getattr(module, SKIP, None)


def mark_router_(module: torch.nn.Module) -> None:
    """Mark ``module`` as a router: class-name targets pass over it."""
    mark_class_targets_skip_(module, "router")


def is_router(module: torch.nn.Module) -> bool:
    """Whether ``module`` was marked by ``mark_router_``."""
    return class_targets_skip(module) == "router"


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches_one(name: str, module: torch.nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return _compiled(target[3:]).fullmatch(name) is not None
    if target == name:
        return True
    return target == type(module).__name__ and class_targets_skip(module) is None


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
