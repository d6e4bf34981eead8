"""Checkpoint bytes pinned per recipe on the embedded model.

Refactors of the pipeline, the statistics hooks, the modifiers or the writer must not move a
single byte of what users load. Each case compresses the embedded tiny Llama and compares the
SHA-256 of its safetensors shards with the digest recorded when the case was added.

The digests hold for the CPU build of the torch version named below on x86-64 (floating-point
sums of the data-driven methods depend on the BLAS kernels); elsewhere the test is skipped rather
than giving a false alarm. A digest is changed only by a commit that means to change the
checkpoint and says why.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest
import torch

from llmc import oneshot
from llmc.plugins import load_registry

PINNED_TORCH = "2.13.0+cpu"

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
    "rtn-w8a16": ("llmc:w8a16", None, "514acee731cfa75d6775eb0a8d6b0c901f6be641ed22864cbed26242dd97b51e"),
    "rtn-w8a8": ("llmc:w8a8", None, "e1ac2c6c65d960c08881149d0055eaf7647c250645c5181bd5dd3340e18dbe6e"),
    "rtn-fp8-dynamic": ("llmc:fp8_dynamic", None, "6f936097f6516480b7edc581dcb7aa821a2f4b37ea0938ba9e6fddaf36d5dc75"),
    "gptq-w4a16": ("llmc:gptq_w4a16", "gptq", "58ff53e1a02a2ab2a67740707fa8c641e4b0534871b1f113639f2e8cc3b432c8"),
    "gptq-w4a16-true-sequential": (GPTQ_TRUE_SEQUENTIAL, "gptq", "669fcb94b90ba84498a36af0cd751b7ff64433b09898a6788695a368229a376d"),
    "sparsegpt-2of4": ("llmc:sparsegpt_2of4", "sparsity", "51f99ecf6d0ac9b28d066cb6c85f2501799c3095991f6d1dd7398b2e948c793a"),
    "sparsegpt-50": ("llmc:sparsegpt_50", "sparsity", "5911ae377f2172dc6385e4e50c1283a54a38a46ea93c94b928118d1a0b12670c"),
    "sparsegpt-2of4-true-sequential": (SPARSEGPT_TRUE_SEQUENTIAL, "sparsity", "f56a622b02fcdb1d410c4db9a82bd68dd704ef252b1599c0307e62144e980ba4"),
    "sparsegpt-2of4-rtn-w4a16": ("llmc:sparsegpt_2of4_w4a16", "sparsity", "ea1d8ccae34c63d25d5df2bb3b8f9264c0fc7e3e5bebf8ec319deda50a26fa7d"),
    "sparsegpt-2of4-gptq-w4a16": (SPARSEGPT_GPTQ, "gptq+sparsity", "993f60a0d73bb071c22782715657d7dff5eff1789b3ad6aa4413b89d4240c1c1"),
    "wanda-50": (WANDA_50, "sparsity", "72b2c4edd4cf682ba91842a925bdba7b0a38b3ff4847e18b3532525f44f6a299"),
}


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for shard in sorted(directory.glob("*.safetensors")):
        sha.update(shard.name.encode())
        sha.update(shard.read_bytes())
    return sha.hexdigest()


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


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_checkpoint_bytes_pinned_per_recipe(case, installed_plugins, one_thread, tmp_path):
    recipe, needs, expected = CASES[case]
    missing = [p for p in (needs or "").split("+") if p and p not in installed_plugins]
    if missing:
        pytest.skip(f"plugin {missing[0]!r} is not installed")
    result = oneshot(
        model="llmc:tiny-llama",
        recipe=recipe,
        dataset="llmc:stdlib-docs",
        num_calibration_samples=8,
        max_seq_length=128,
        output_dir=str(tmp_path / "out"),
    )
    assert _digest(result.output_dir) == expected, f"{case}: checkpoint bytes changed"


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
