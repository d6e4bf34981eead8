"""Loading checkpoints whose experts are per-expert Linears where transformers expects them fused.

llmc writes every unfused expert as its own Linears (``mlp.experts.3.gate_proj``), the layout
vLLM and llm-compressor use. For most architectures transformers' loader merges such tensors
into its fused experts itself. For some it does not: GPT-OSS checkpoints are read only with
``gate_up_proj`` fused, and Llama 4's only when quantized (``transformers.quantizers.base``
swaps its experts for Linears then); transformers' save-time conversion tells which, as it
keeps their tensors fused. For those, ``unfusing_model_class`` gives a subclass of the model
class that unfuses its experts as soon as it is built, so transformers' own ``from_pretrained``
(and compressed-tensors' quantizer in it) finds a Linear for every per-expert tensor. The subclass keeps the class's name, so a saved config names the original
architecture.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmc.experts_adapters import ExpertsAdapter

__all__ = ["unfusing_model_class"]


def _fused_in_checkpoints(skeleton: Any, files: dict[str, Path]) -> list[str]:
    """The experts modules of ``skeleton`` that transformers stores fused (its save-time
    conversion keeps a fused tensor) while the checkpoint ``files`` name them one by one."""
    from transformers.core_model_loading import revert_weight_conversion

    from llmc.moe import find_fused_experts

    found = []
    for name, module in find_fused_experts(skeleton):
        fused = {f"{name}.{local}": tensor for local, tensor in module.named_parameters(recurse=False)}
        stored = list(revert_weight_conversion(skeleton, fused))
        if not stored or re.search(r"\.\d+\.\w+\.(weight|bias)$", stored[0]):
            continue  # transformers reads (and writes) this module's experts one by one itself
        per_expert = re.compile(re.escape(stored[0].rpartition(".")[0]) + r"\.\d+\.")
        if any(per_expert.match(key) for key in files):
            found.append(name)
    return found


def unfusing_model_class(
    folder: Path, config: Any, model_class: type, adapters: Sequence[type[ExpertsAdapter]] | None = None
) -> type | None:
    """A subclass of ``model_class`` that unfuses its experts when built, when the checkpoint in
    ``folder`` names per-expert tensors of experts transformers reads only fused; else None."""
    from accelerate import init_empty_weights

    from llmc.lazy_weights import checkpoint_files
    from llmc.moe import resolve_adapters, unfuse_experts_

    files = checkpoint_files(folder)
    if isinstance(files, str) or not any(re.search(r"\.experts\.\d+\.", key) for key in files):
        return None
    try:
        with init_empty_weights(include_buffers=False):
            skeleton = model_class(config)
    except Exception:  # transformers' own from_pretrained reports what is wrong with the config
        return None
    names = _fused_in_checkpoints(skeleton, files)
    if not names:
        return None
    adapters = resolve_adapters(adapters)

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **kwargs)
        unfuse_experts_(self, adapters, modules=names)

    return type(
        model_class.__name__, (model_class,),
        {"__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__},
    )
