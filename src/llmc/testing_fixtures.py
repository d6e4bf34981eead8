"""pytest fixtures for plugin test suites, built from ``llmc.testing`` (needs pytest).

A plugin's ``tests/conftest.py`` imports the ones it uses instead of writing them again::

    from llmc.testing_fixtures import model_dir, one_thread, text_file, tokenizer  # noqa: F401

Importing this module also makes the hub unreachable for the tests (``HF_HUB_OFFLINE``), so a
test that would download fails at once instead of after retries.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from llmc.testing import build_tokenizer, save_tiny_model, write_text_file  # noqa: E402

__all__ = ["model_dir", "one_thread", "text_file", "tokenizer"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny random Llama with its tokenizer, loadable by path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local jsonl calibration file."""
    return write_text_file(tmp_path_factory.mktemp("data") / "calibration.jsonl")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine every torch
    op (and every parallel numba kernel) waits for it at barriers (tests ran 5x slower);
    restored afterwards."""
    import torch

    try:
        import numba
    except ImportError:
        numba = None
    threads = torch.get_num_threads()
    numba_threads = numba.get_num_threads() if numba is not None else None
    torch.set_num_threads(1)
    if numba is not None:
        numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(numba_threads)
