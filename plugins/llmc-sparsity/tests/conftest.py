"""Fixtures of the sparsity plugin's tests (helpers live in ``sparsity_helpers``); no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from sparsity_helpers import SENTENCES, make_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny random Llama with its tokenizer, loadable by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local jsonl calibration file."""
    path = tmp_path_factory.mktemp("data") / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in SENTENCES))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine every torch
    op (and every parallel numba sweep) waits for it at barriers; restored afterwards."""
    import numba
    import torch

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)
