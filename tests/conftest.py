"""Shared fixtures: tiny random models and a tokenizer built here, so no test needs a network."""

from __future__ import annotations

from pathlib import Path

import pytest

# first: importing it sets the offline flags before transformers and huggingface_hub load
from llmc.testing_fixtures import text_file, tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # noqa: F811
    """A saved tiny random Llama with its tokenizer, loadable by path like a real checkpoint."""
    from llmc.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
