"""Shared fixtures: tiny random models and a tokenizer built here, so no test needs a network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from llmc_testing import SAMPLE_TEXT, build_causal_lm, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny random Llama with its tokenizer, loadable by path like a real checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_causal_lm("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local jsonl calibration file."""
    import json

    path = tmp_path_factory.mktemp("data") / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in SAMPLE_TEXT))
    return path
