"""Bad input through the Python API and the CLI: one clear line, nothing left behind.

Each case names the bad value and what would be accepted; where an output directory was asked
for, nothing appears next to it. CLI cases call ``llmc.cli.main`` (the same code path as the
``llmc`` command); the subprocess cases of argument parsing are in test_cli_errors.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from llmc import oneshot
from llmc.cli import main
from llmc.errors import ArgumentError, DataError, ModelLoadError, RecipeError
from llmc.modifiers.quantization import QuantizationModifier


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("llmc: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


def _siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir()) if output.parent.exists() else []


@pytest.fixture
def truncated_model(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return folder


@pytest.fixture
def custom_code_model(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "acme"
    config["auto_map"] = {"AutoConfig": "configuration_acme.AcmeConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_acme.py").write_text(
        "from transformers import LlamaConfig\n\nclass AcmeConfig(LlamaConfig):\n    model_type = 'acme'\n"
    )
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_device_without_a_gpu_is_one_line(device, capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["oneshot", "--model", "llmc:tiny-llama", "--recipe", "llmc:w4a16", "--device", device, "--output-dir", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert f"'device' '{device}' needs a CUDA GPU" in line and "use device 'cpu'" in line
    assert _siblings(out) == []


def test_truncated_safetensors_is_one_line(truncated_model, capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["oneshot", "--model", str(truncated_model), "--recipe", "llmc:w4a16", "--output-dir", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "a safetensors file is truncated or corrupt" in line and str(truncated_model.name) in line
    assert "out" not in _siblings(out)
    with pytest.raises(ModelLoadError, match=r"cannot read the weights of model .*truncated.*: a safetensors file is truncated or corrupt"):
        oneshot(model=str(truncated_model), recipe="llmc:w4a16")


def test_custom_code_without_trust_remote_code_names_our_flag(custom_code_model, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["oneshot", "--model", str(custom_code_model), "--recipe", "llmc:w4a16", "--output-dir", str(out)]) == 2
    assert "pass --trust-remote-code" in _one_error_line(capsys)
    assert "out" not in _siblings(out)
    with pytest.raises(ModelLoadError, match=r"needs its own Python code to load .* pass --trust-remote-code \(Python: trust_remote_code=True\)"):
        oneshot(model=str(custom_code_model), recipe="llmc:w4a16")


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_empty_data_file_says_so(content, tmp_path, capsys):
    from llmc.args import DatasetArguments
    from llmc.data import load_raw_dataset

    data = tmp_path / "calibration.jsonl"
    data.write_text(content)
    with pytest.raises(DataError, match=r"the file .*calibration.jsonl is empty \(0 bytes of data\); give it rows of text"):
        load_raw_dataset(DatasetArguments(dataset=str(data)))
    pytest.importorskip("llmc_gptq")
    out = tmp_path / "out"
    code = main(["oneshot", "--model", "llmc:tiny-llama", "--recipe", "llmc:gptq_w4a16", "--dataset", str(data), "--output-dir", str(out)])
    assert code == 2
    assert "calibration.jsonl is empty" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.jsonl"]


def test_empty_recipe_list_says_the_list_is_empty():
    with pytest.raises(RecipeError, match=r"the recipe list is empty; give at least one modifier"):
        oneshot(model="llmc:tiny-llama", recipe=[])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schem": "W4A16"}, r"QuantizationModifier has no parameter 'schem'; did you mean 'scheme'\?"),
        ({"scheme": "W4A16", "ignored": ["lm_head"]}, r"QuantizationModifier has no parameter 'ignored'; did you mean 'ignore'\?"),
    ],
    ids=["schem", "ignored"],
)
def test_mistyped_modifier_parameter_from_python_gets_the_closest_name(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        QuantizationModifier(**kwargs)


def test_more_samples_than_rows_warns_with_both_numbers_before_tokenizing(tmp_path, caplog):
    from llmc.args import DatasetArguments
    from llmc.data import load_calibration_data
    from llmc.testing import build_tokenizer

    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a tiny file"}) + "\n" for i in range(5)))
    with caplog.at_level(logging.WARNING, logger="llmc.data"):
        samples = load_calibration_data(DatasetArguments(dataset=str(data), num_calibration_samples=1000), build_tokenizer())
    assert len(samples) == 5
    assert "num_calibration_samples=1000 but the dataset has 5 rows" in caplog.text


def test_too_few_tokens_for_the_hessian_is_a_warning(caplog):
    pytest.importorskip("llmc_gptq")
    from llmc_gptq import GPTQModifier

    with caplog.at_level(logging.WARNING, logger="llmc.statistics"):
        oneshot(model="llmc:tiny-llama", recipe=GPTQModifier(scheme="W4A16"), dataset="llmc:stdlib-docs",
                num_calibration_samples=2, max_seq_length=4)
    assert "come from 8 tokens, fewer than its 256 input columns" in caplog.text
    assert caplog.text.count("fewer than its") == 1  # once per run, not per layer
