"""What forward hooks a model carries: the one place that reads torch's hook tables.

torch has no public way to list or remove a module's hooks except through the handle returned
when each was registered. Two things need more: the calibration layer must know whether some
*other* hook is on a layer before it cuts a batch short (``has_foreign_hooks``), and a failed
run must leave the caller's model with exactly the hooks it had (``hook_ids`` before,
``remove_hooks_added_since`` after); and a quantized Linear's input hook must be installed once
however often the module is re-quantized (``remove_forward_pre_hooks``). All read the private
tables here and nowhere else.
"""

from __future__ import annotations

import torch

__all__ = [
    "has_forward_pre_hook",
    "has_foreign_hooks",
    "hook_ids",
    "remove_forward_pre_hooks",
    "remove_hooks_added_since",
]

# torch keeps a module's hooks in these tables, keyed by the id of the hook's handle; the
# second group holds per-hook flags (with_kwargs, always_call) under the same ids. Reading them
# is the only way to know which hooks a module has (torch has no public listing).
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_HOOK_FLAG_TABLES = (
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
)


def hook_ids(model: torch.nn.Module) -> dict[torch.nn.Module, dict[str, frozenset[int]]]:
    """The handle ids of every hook on each module of ``model``, per table."""
    return {
        module: {name: frozenset(getattr(module, name, ())) for name in _HOOK_TABLES}
        for module in model.modules()
    }


def remove_hooks_added_since(
    model: torch.nn.Module, before: dict[torch.nn.Module, dict[str, frozenset[int]]]
) -> int:
    """Remove the hooks not in ``before`` (as ``RemovableHandle.remove`` does); returns how many."""
    removed = 0
    for module in model.modules():
        known = before.get(module, {})
        for name in _HOOK_TABLES:
            table = getattr(module, name, None)
            if not table:
                continue
            for hook_id in [key for key in table if key not in known.get(name, ())]:
                del table[hook_id]
                for flag_name in _HOOK_FLAG_TABLES:
                    getattr(module, flag_name, {}).pop(hook_id, None)
                removed += 1
    return removed


def has_foreign_hooks(layer: torch.nn.Module, own: set[int]) -> bool:
    """Whether a forward hook not in ``own`` (hook handle ids) is on ``layer`` or inside it.

    Global hooks (``register_module_forward_hook``) count as foreign too.
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    for module in layer.modules():
        for table in (module._forward_pre_hooks, module._forward_hooks):
            if any(key not in own for key in table):
                return True
    return False


def remove_forward_pre_hooks(module: torch.nn.Module, function: object) -> int:
    """Remove every forward pre-hook of ``module`` that is ``function``; returns how many."""
    table = module._forward_pre_hooks
    found = [key for key, hook in table.items() if hook is function]
    for key in found:
        del table[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    return len(found)


def has_forward_pre_hook(module: torch.nn.Module, function: object) -> bool:
    """Whether ``function`` is one of ``module``'s forward pre-hooks."""
    return any(hook is function for hook in module._forward_pre_hooks.values())
