"""Checkpoint bytes pinned per recipe on the embedded model.

Refactors of the pipeline, the statistics hooks, the modifiers or the writer must not move a
single byte of what users load. Each case compresses the embedded tiny Llama and compares the
SHA-256 of its safetensors shards with the digest recorded when the case was added.

The digests hold for the CPU build of the torch version named below on x86-64. Floating-point
sums of the data-driven methods depend on the kernels the libraries pick for the CPU at hand
(torch's AVX2 or AVX-512 loops, MKL's code path for Intel or AMD, numba's FMA), so the cases run
in one child process with every choice pinned to its portable form (``KERNEL_ENV``) and one
thread; elsewhere the test is skipped rather than giving a false alarm. A digest is changed only
by a commit that means to change the checkpoint and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc import oneshot
from llmc.plugins import load_registry

PINNED_TORCH = "2.13.0+cpu"

# torch's scalar loops, oneDNN's baseline kernels, MKL's conditional numerical reproducibility mode (the same results on
# Intel and AMD), numba's code for a generic x86-64 (no FMA contraction), one thread.
KERNEL_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "NUMBA_CPU_NAME": "generic",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

pytestmark = pytest.mark.skipif(
    torch.__version__ != PINNED_TORCH or platform.machine() != "x86_64",
    reason=f"digests were recorded with torch {PINNED_TORCH} on x86-64",
)

WANDA_50 = """
prune_stage:
  prune_modifiers:
    WandaPruningModifier: {sparsity: 0.5}
"""
GPTQ_TRUE_SEQUENTIAL = """
quant_stage:
  quant_modifiers:
    GPTQModifier: {scheme: W4A16, true_sequential: true}
"""
SPARSEGPT_TRUE_SEQUENTIAL = """
prune_stage:
  prune_modifiers:
    SparseGPTModifier: {mask_structure: "2:4", true_sequential: true}
"""
SPARSEGPT_GPTQ = """
prune_stage:
  prune_modifiers:
    SparseGPTModifier: {mask_structure: "2:4"}
    GPTQModifier: {scheme: W4A16}
"""

# id -> (recipe, plugin it needs or None, sha256 of the safetensors shards)
CASES: dict[str, tuple[str, str | None, str]] = {
    "rtn-w4a16": ("llmc:w4a16", None, "73c9f8aacc85900e9bf51667fce99b0e22aef943be2a23a9df4887c603cca76a"),
    "rtn-w4a16-asym": ("llmc:w4a16_asym", None, "052ef20c8c2a723eba61610b47edb4b18d2a5447dcef960ddbec55fabb6f1a1d"),
    "rtn-w8a16": ("llmc:w8a16", None, "ded0866a9536735681db18f71f28016521da10be005ddd722f0be0be6780e48c"),
    "rtn-w8a8": ("llmc:w8a8", None, "e1ac2c6c65d960c08881149d0055eaf7647c250645c5181bd5dd3340e18dbe6e"),
    "rtn-fp8-dynamic": ("llmc:fp8_dynamic", None, "6f936097f6516480b7edc581dcb7aa821a2f4b37ea0938ba9e6fddaf36d5dc75"),
    "gptq-w4a16": ("llmc:gptq_w4a16", "gptq", "5da0771a70086029e9decec5e9175761fa95d30abfab058a514db8c7408dafe9"),
    "gptq-w4a16-true-sequential": (GPTQ_TRUE_SEQUENTIAL, "gptq", "80d59e933d9c5a59164043828103e6b1067975ffd93e7046f82015cec711c9b1"),
    "sparsegpt-2of4": ("llmc:sparsegpt_2of4", "sparsity", "833db2a5f4ad6cf362bdc6bd5527d340fbf758835862b19192ed7c8e336b81f7"),
    "sparsegpt-50": ("llmc:sparsegpt_50", "sparsity", "ec7e4da904bdd0d8048311a68f274aaeeb3b173d0242365582517b4547b04a69"),
    "sparsegpt-2of4-true-sequential": (SPARSEGPT_TRUE_SEQUENTIAL, "sparsity", "427fb94e6e04f4b8f81d3b338348d6212e1dce6ca642e65fe7a2be03a2b4d430"),
    "sparsegpt-2of4-rtn-w4a16": ("llmc:sparsegpt_2of4_w4a16", "sparsity", "da4ca8ba25161317f25b65be785636535683e024f48f6a80e39a1693017e48be"),
    "sparsegpt-2of4-gptq-w4a16": (SPARSEGPT_GPTQ, "gptq+sparsity", "c2ddd9e65a2146012309ddb5d2b030f064ce4ccfb7e4134b4dfdd6e2fefab103"),
    "wanda-50": (WANDA_50, "sparsity", "b16b84315e6b00671bef9dba6718c37309ad1ba0d2b8bea564d41b0382394bea"),
}


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for shard in sorted(directory.glob("*.safetensors")):
        sha.update(shard.name.encode())
        sha.update(shard.read_bytes())
    return sha.hexdigest()


# Run in a child process: the kernel choice is fixed when torch is imported.
_CHILD = """
import hashlib, json, sys
from pathlib import Path
import torch
from llmc import oneshot
torch.set_num_threads(1)
cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
digests = {}
for case, recipe in cases.items():
    result = oneshot(model="llmc:tiny-llama", recipe=recipe, dataset="llmc:stdlib-docs",
                     num_calibration_samples=8, max_seq_length=128,
                     output_dir=str(out / case))
    sha = hashlib.sha256()
    for shard in sorted(Path(result.output_dir).glob("*.safetensors")):
        sha.update(shard.name.encode())
        sha.update(shard.read_bytes())
    digests[case] = sha.hexdigest()
(out / "digests.json").write_text(json.dumps(digests))
"""


@pytest.fixture
def one_thread():
    """The digests were recorded single-threaded (a BLAS sum's order follows the threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def installed_plugins() -> set[str]:
    return set(load_registry().plugin_names)


@pytest.fixture(scope="module")
def pinned_digests(installed_plugins, tmp_path_factory) -> dict[str, str]:
    """Every runnable case's digest, computed once in a child with the kernels pinned."""
    runnable = {
        case: recipe
        for case, (recipe, needs, _) in CASES.items()
        if all(p in installed_plugins for p in (needs or "").split("+") if p)
    }
    out = tmp_path_factory.mktemp("pinned")
    env = {**os.environ, **KERNEL_ENV}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(runnable), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "digests.json").read_text())


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_checkpoint_bytes_pinned_per_recipe(case, installed_plugins, pinned_digests):
    recipe, needs, expected = CASES[case]
    missing = [p for p in (needs or "").split("+") if p and p not in installed_plugins]
    if missing:
        pytest.skip(f"plugin {missing[0]!r} is not installed")
    assert pinned_digests[case] == expected, f"{case}: checkpoint bytes changed ({pinned_digests[case]})"


def test_a_rerun_with_overwrite_writes_the_same_bytes(installed_plugins, one_thread, tmp_path):
    """Determinism without pinned digests: the same run twice, the second over the first."""
    recipe = "llmc:gptq_w4a16" if "gptq" in installed_plugins else "llmc:w4a16"
    digests = []
    for overwrite in (False, True):
        result = oneshot(
            model="llmc:tiny-llama", recipe=recipe, dataset="llmc:stdlib-docs",
            num_calibration_samples=8, max_seq_length=128, output_dir=str(tmp_path / "out"),
            overwrite=overwrite,
        )
        digests.append(_digest(result.output_dir))
    assert digests[0] == digests[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
