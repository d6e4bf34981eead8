"""Fixtures of the awq plugin's tests: the shared ones from ``llmc.testing_fixtures``; no network."""

from llmc.testing_fixtures import model_dir, one_thread, text_file, tokenizer  # noqa: F401
