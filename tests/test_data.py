"""Calibration data: presets, local files, hub names offline, tokenization and batching."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import time
import tracemalloc
from pathlib import Path

import datasets
import pytest
import torch

from llmc import hub as hub_module
from llmc.args import DatasetArguments
from llmc.data import (
    dataset_presets,
    load_calibration_data,
    load_raw_dataset,
    make_batches,
    padding_token_id,
    register_dataset_preset,
    tokenize_calibration_data,
)
from llmc.data import presets as presets_module
from llmc.data import row_order as row_order_module
from llmc.data import sources as sources_module
from llmc.errors import ArgumentError, DataError, PluginError
from llmc.hub import hub_is_reachable

ASSETS = Path(__file__).resolve().parents[1] / "src" / "llmc" / "assets"
STDLIB_TRAIN = ASSETS / "stdlib_docs" / "train.jsonl.gz"
STDLIB_HELDOUT = ASSETS / "stdlib_docs" / "heldout.jsonl.gz"

LINES = [f"line number {i} says something about item {i * 7 % 13}." for i in range(20)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


@pytest.fixture
def bos_tokenizer(tokenizer):
    """The shared test tokenizer, made to add BOS by default as Llama's does."""
    from tokenizers import processors

    from llmc.testing import build_tokenizer

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def _args(**kwargs) -> DatasetArguments:
    kwargs.setdefault("shuffle_calibration_samples", False)
    return DatasetArguments(**kwargs)


def _write(path: Path, kind: str, lines: list[str] = LINES) -> Path:
    if kind in ("json", "jsonl"):
        path.write_text(
            "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(lines))
        )
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as handle:
            handle.writelines(json.dumps({"text": t}) + "\n" for t in lines)
    elif kind == "csv":
        datasets.Dataset.from_dict({"text": lines}).to_csv(str(path))
    elif kind == "parquet":
        datasets.Dataset.from_dict({"text": lines}).to_parquet(str(path))
    elif kind == "txt":
        path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- raw loading


@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl.gz", "csv", "parquet", "txt"])
def test_load_raw_dataset_reads_each_local_file_type(tmp_path: Path, cache: str, kind: str) -> None:
    path = _write(tmp_path / f"data.{kind}", kind)
    dataset = load_raw_dataset(_args(dataset=str(path)), cache_dir=cache)
    assert dataset["text"] == LINES


def test_load_raw_dataset_reads_a_folder_with_splits_from_file_names(
    tmp_path: Path, cache: str
) -> None:
    folder = tmp_path / "data"
    (folder / "test").mkdir(parents=True)
    _write(folder / "train.jsonl", "jsonl", LINES[:12])
    _write(folder / "test" / "part-0.jsonl", "jsonl", LINES[12:])
    (folder / "README.md").write_text("not data")
    assert load_raw_dataset(_args(dataset=str(folder)), cache_dir=cache)["text"] == LINES[:12]
    test = load_raw_dataset(_args(dataset=str(folder), splits="test"), cache_dir=cache)
    assert test["text"] == LINES[12:]


def test_load_raw_dataset_refuses_a_folder_mixing_formats(tmp_path: Path, cache: str) -> None:
    _write(tmp_path / "a.jsonl", "jsonl")
    _write(tmp_path / "b.csv", "csv")
    with pytest.raises(DataError, match=r"mixes csv and json files"):
        load_raw_dataset(_args(dataset=str(tmp_path)), cache_dir=cache)


def test_load_raw_dataset_unreadable_file_is_a_data_error(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"^cannot read .*broken.jsonl as json: \w+"):
        load_raw_dataset(_args(dataset=str(path)), cache_dir=cache)


def test_load_raw_dataset_takes_dataset_path_with_a_format_name(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "rows.data"
    _write(path, "jsonl")
    dataset = load_raw_dataset(_args(dataset="json", dataset_path=str(path)), cache_dir=cache)
    assert len(dataset) == len(LINES)
    with pytest.raises(DataError, match=r"cannot tell the format of .*rows.data: expected a file"):
        load_raw_dataset(_args(dataset_path=str(path)), cache_dir=cache)


def test_load_raw_dataset_refuses_both_dataset_and_dataset_path(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"pass only one"):
        load_raw_dataset(_args(dataset="llmc:stdlib-docs", dataset_path=str(tmp_path)))


def test_load_raw_dataset_without_any_data_names_the_argument() -> None:
    with pytest.raises(ArgumentError, match=r"no calibration data given; pass dataset="):
        load_raw_dataset(_args())


@pytest.mark.parametrize("name", ["./missing.jsonl", "data/none.csv", "/no/such/dir", "x.parquet"])
def test_load_raw_dataset_missing_path_names_it(name: str) -> None:
    with pytest.raises(DataError, match=rf"dataset path '{name}' does not exist"):
        load_raw_dataset(_args(dataset=name))


def test_load_raw_dataset_returns_a_dataset_object_as_is() -> None:
    dataset = datasets.Dataset.from_dict({"text": LINES})
    assert load_raw_dataset(_args(dataset=dataset)) is dataset


def test_load_raw_dataset_picks_the_split_of_a_dataset_dict() -> None:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": LINES[:10]}),
            "validation": datasets.Dataset.from_dict({"text": LINES[10:]}),
        }
    )
    assert load_raw_dataset(_args(dataset=dd))["text"] == LINES[:10]
    assert load_raw_dataset(_args(dataset=dd, splits="validation"))["text"] == LINES[10:]
    assert load_raw_dataset(_args(dataset=dd, splits="train[:50%]"))["text"] == LINES[:5]
    both = load_raw_dataset(_args(dataset=dd, splits="train[:2]+validation[-1:]"))
    assert both["text"] == [LINES[0], LINES[1], LINES[-1]]


def test_load_raw_dataset_unknown_split_names_the_available_ones() -> None:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": LINES}),
            "validation": datasets.Dataset.from_dict({"text": LINES}),
        }
    )
    with pytest.raises(
        DataError,
        match=r"unknown split 'valid' in the given DatasetDict; did you mean 'validation'\? "
        r"\(available splits: train, validation\)",
    ):
        load_raw_dataset(_args(dataset=dd, splits="valid"))


def test_load_raw_dataset_without_train_split_asks_to_choose() -> None:
    dd = datasets.DatasetDict(
        {
            "a": datasets.Dataset.from_dict({"text": LINES}),
            "b": datasets.Dataset.from_dict({"text": LINES}),
        }
    )
    with pytest.raises(DataError, match=r"no 'train' split; choose one .*available splits: a, b"):
        load_raw_dataset(_args(dataset=dd))


def test_load_raw_dataset_bad_split_syntax_is_explained() -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LINES})})
    with pytest.raises(DataError, match=r"cannot read splits='train\[:x'"):
        load_raw_dataset(_args(dataset=dd, splits="train[:x"))


def test_hub_name_offline_fails_fast_with_one_line() -> None:
    started = time.perf_counter()
    with pytest.raises(DataError) as caught:
        load_raw_dataset(_args(dataset="wikitext", dataset_config_name="wikitext-2-raw-v1"))
    assert time.perf_counter() - started < 5
    assert str(caught.value) == (
        "cannot load dataset 'wikitext' from the Hugging Face hub (offline or unreachable); "
        "pass a local file with dataset=path/to/data.jsonl or a preset such as 'llmc:stdlib-docs'"
    )


def test_hub_unreachable_without_offline_setting_loads_in_offline_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreachable hub switches the libraries to offline mode, so the cache answers at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources_module, "hub_is_reachable", lambda: False)
    seen = {}

    def fake_load_dataset(name, config_name=None, **kwargs):
        seen["offline"] = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(
        DataError, match=r"cannot load dataset 'org/name' from the Hugging Face hub"
    ):
        load_raw_dataset(_args(dataset="org/name"))
    assert seen["offline"] == (True, True)
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)


def test_hub_is_reachable_is_false_when_offline_is_set() -> None:
    assert hub_is_reachable() is False


# --------------------------------------------------------------------------- presets


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(DataError, match=r"unknown dataset preset 'llmc:stdlib-doc'; did you mean"):
        load_raw_dataset(_args(dataset="llmc:stdlib-doc"))


def test_registered_preset_loads_and_duplicates_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(presets_module, "_PRESETS", dict(presets_module._PRESETS))
    register_dataset_preset("acme:lines", lambda: datasets.Dataset.from_dict({"text": LINES}))
    assert "acme:lines" in dataset_presets()
    assert load_raw_dataset(_args(dataset="acme:lines", splits="train[:3]"))["text"] == LINES[:3]
    with pytest.raises(PluginError, match=r"dataset preset 'acme:lines' is already registered"):
        register_dataset_preset("acme:lines", lambda: datasets.Dataset.from_dict({"text": []}))


def test_builtin_presets_are_registered() -> None:
    assert {"llmc:stdlib-docs", "llmc:stdlib-docs-heldout"} <= set(dataset_presets())


@pytest.mark.skipif(not STDLIB_TRAIN.exists(), reason="embedded corpus not built yet")
def test_stdlib_docs_preset_loads_the_embedded_train_split(tokenizer) -> None:
    dataset = load_raw_dataset(_args(dataset="llmc:stdlib-docs"))
    assert len(dataset) > 100 and {"text", "source"} <= set(dataset.column_names)
    samples = load_calibration_data(
        DatasetArguments(dataset="llmc:stdlib-docs", num_calibration_samples=16, max_seq_length=64),
        tokenizer,
    )
    assert len(samples) == 16 and all(0 < s.numel() <= 64 for s in samples)


@pytest.mark.skipif(not STDLIB_HELDOUT.exists(), reason="embedded corpus not built yet")
def test_stdlib_docs_heldout_preset_is_disjoint_from_train() -> None:
    heldout = load_raw_dataset(_args(dataset="llmc:stdlib-docs-heldout"))
    assert len(heldout) > 10
    if STDLIB_TRAIN.exists():
        train = load_raw_dataset(_args(dataset="llmc:stdlib-docs"))
        assert not set(heldout["source"]) & set(train["source"])
    with pytest.raises(
        DataError, match=r"unknown split 'test' in preset 'llmc:stdlib-docs-heldout'"
    ):
        load_raw_dataset(_args(dataset="llmc:stdlib-docs-heldout", splits="test"))


# --------------------------------------------------------------------------- tokenization


def test_tokenize_adds_bos_truncates_and_drops_empty_rows(bos_tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": ["", LINES[0], "   ", None, LINES[1] * 20]})
    samples = tokenize_calibration_data(
        dataset, bos_tokenizer, _args(max_seq_length=16, num_calibration_samples=8)
    )
    assert len(samples) == 2
    assert all(s.dtype == torch.long and s.dim() == 1 for s in samples)
    assert samples[0].tolist() == bos_tokenizer(LINES[0])["input_ids"][:16]
    assert samples[0][0].item() == bos_tokenizer.bos_token_id
    assert samples[1].numel() == 16


def test_tokenize_uses_input_ids_as_is(tokenizer) -> None:
    ids = [[5, 6, 7, 8, 9, 10], [11, 12], []]
    dataset = datasets.Dataset.from_dict({"input_ids": ids, "text": ["x", "y", "z"]})
    samples = tokenize_calibration_data(dataset, tokenizer, _args(max_seq_length=4))
    assert [s.tolist() for s in samples] == [[5, 6, 7, 8], [11, 12]]


def test_tokenize_applies_a_preprocessing_callable(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"question": ["a b", "c d"], "answer": ["e", "f"]})

    def to_text(row):
        return {"text": f"{row['question']} = {row['answer']}"}

    samples = tokenize_calibration_data(dataset, tokenizer, _args(preprocessing_func=to_text))
    assert [tokenizer.decode(s) for s in samples] == ["a b = e", "c d = f"]


def test_tokenize_imports_a_preprocessing_function_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer
) -> None:
    (tmp_path / "my_prep.py").write_text("def shout(row):\n    return row['text'].upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dataset = datasets.Dataset.from_dict({"text": ["abc"]})
    samples = tokenize_calibration_data(
        dataset, tokenizer, _args(preprocessing_func="my_prep:shout")
    )
    assert tokenizer.decode(samples[0]) == "ABC"


@pytest.mark.parametrize(
    ("func", "message"),
    [
        ("my_prep.shout", r"must have the form 'module:function'"),
        ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
        (
            "json:lods",
            r"module 'json' has no attribute 'lods' \(preprocessing_func\); did you mean 'loads'",
        ),
        ("json:__name__", r"is a str, not a function"),
        (42, r"must be a callable or a 'module:function' string \(got int\)"),
    ],
    ids=["no-colon", "missing-module", "missing-attribute", "not-callable", "wrong-type"],
)
def test_bad_preprocessing_func_is_an_argument_error(tokenizer, func, message) -> None:
    dataset = datasets.Dataset.from_dict({"text": ["abc"]})
    with pytest.raises(ArgumentError, match=message) as caught:
        tokenize_calibration_data(dataset, tokenizer, _args(preprocessing_func=func))
    assert caught.value.name == "preprocessing_func"


def test_concatenation_gives_exactly_max_seq_length_per_sample(bos_tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": LINES})
    args = _args(concatenate_data=True, max_seq_length=24, num_calibration_samples=100)
    samples = tokenize_calibration_data(dataset, bos_tokenizer, args)
    assert samples and all(s.numel() == 24 for s in samples)
    stream = torch.cat(samples).tolist()
    eos = bos_tokenizer.eos_token_id
    expected = []
    for line in LINES:
        expected += bos_tokenizer(line)["input_ids"] + [eos]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 24  # only the last partial piece is dropped


def test_concatenation_with_too_little_text_is_a_data_error(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": ["short"]})
    with pytest.raises(DataError, match=r"fewer than one sample of max_seq_length=384"):
        tokenize_calibration_data(dataset, tokenizer, _args(concatenate_data=True))


def test_shuffle_is_deterministic_by_seed_and_differs_across_seeds(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": LINES})

    def run(seed: int) -> list[list[int]]:
        args = DatasetArguments(num_calibration_samples=10, seed=seed)
        return [s.tolist() for s in tokenize_calibration_data(dataset, tokenizer, args)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    unshuffled = tokenize_calibration_data(dataset, tokenizer, _args(num_calibration_samples=3))
    assert [tokenizer.decode(s) for s in unshuffled] == LINES[:3]


def test_lazy_row_order_of_large_datasets_is_a_seeded_permutation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(row_order_module, "_RANDPERM_ORDER_MAX_ROWS", 10)
    order = list(row_order_module.row_order(1000, True, seed=3))
    assert sorted(order) == list(range(1000))
    assert order != list(range(1000))
    assert order == list(row_order_module.row_order(1000, True, seed=3))


@pytest.mark.parametrize(
    ("num_rows", "seed"),
    [(1, 0), (2, 42), (17, 3), (1000, 42), (4099, -1), (50_000, 2**40 + 5)],
    ids=lambda value: str(value),
)
def test_row_order_is_torch_randperm_so_checkpoints_keep_their_rows(num_rows, seed) -> None:
    """The order llmc has always drawn (torch.randperm), now lazy: the rows a seed picks stay."""
    expected = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    taken = min(num_rows, 3000)
    order = row_order_module.row_order(num_rows, True, seed)
    assert list(itertools.islice(order, taken)) == expected[:taken]
    if num_rows <= 1000:
        assert list(row_order_module.row_order(num_rows, True, seed)) == expected


@pytest.mark.parametrize(
    "num_rows", [row_order_module._RANDPERM_ORDER_MAX_ROWS, 10**12], ids=["randperm", "drawn"]
)
def test_row_order_takes_memory_for_the_rows_read_only(
    num_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list of all row indices (millions here) would take tens of MB; 1000 rows take little."""

    def refuse(*args, **kwargs):
        raise AssertionError("row_order must not permute every row")

    monkeypatch.setattr(torch, "randperm", refuse)
    tracemalloc.start()
    try:
        rows = list(itertools.islice(row_order_module.row_order(num_rows, True, seed=42), 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(set(rows)) == 1000
    assert all(0 <= row < num_rows for row in rows)
    assert peak < 1 << 20


def test_only_the_rows_needed_are_tokenized(tokenizer) -> None:
    calls: list[int] = []

    class CountingTokenizer:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return tokenizer(texts, **kwargs)

    dataset = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20000)]})
    samples = tokenize_calibration_data(
        dataset, CountingTokenizer(), DatasetArguments(num_calibration_samples=10)
    )
    assert len(samples) == 10
    assert sum(calls) <= 30


def test_fewer_samples_than_asked_warns_and_uses_what_exists(tokenizer, caplog) -> None:
    dataset = datasets.Dataset.from_dict({"text": LINES[:5]})
    with caplog.at_level(logging.WARNING, logger="llmc.data"):
        samples = tokenize_calibration_data(dataset, tokenizer, _args(num_calibration_samples=50))
    assert len(samples) == 5
    assert "using 5 calibration samples: the data gives only 5 of the 50 asked for" in caplog.text


def test_empty_dataset_is_a_data_error(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(DataError, match=r"^the calibration dataset is empty \(0 rows\)"):
        tokenize_calibration_data(dataset, tokenizer, _args())


def test_dataset_of_empty_texts_is_a_data_error(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": ["", " ", None]})
    with pytest.raises(
        DataError, match=r"no calibration samples: all 3 rows have empty column 'text'"
    ):
        tokenize_calibration_data(dataset, tokenizer, _args())


def test_missing_text_column_names_the_existing_columns(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"body": ["a"], "id": [1]})
    with pytest.raises(
        DataError,
        match=r"^column 'text' not found in the calibration data \(columns: body, id\); "
        r"pass text_column=",
    ):
        tokenize_calibration_data(dataset, tokenizer, _args())


def test_non_string_text_column_asks_for_preprocessing(tokenizer) -> None:
    dataset = datasets.Dataset.from_dict({"text": [["a", "b"]]})
    with pytest.raises(
        DataError, match=r"holds list values, expected str; pass preprocessing_func"
    ):
        tokenize_calibration_data(dataset, tokenizer, _args())


def test_load_calibration_data_reads_a_local_file(text_file: Path, tokenizer, cache: str) -> None:
    args = DatasetArguments(dataset=str(text_file), num_calibration_samples=4, max_seq_length=8)
    samples = load_calibration_data(args, tokenizer, cache_dir=cache)
    assert len(samples) == 4 and all(0 < s.numel() <= 8 for s in samples)


# --------------------------------------------------------------------------- batching


def test_make_batches_pads_right_and_masks_padding() -> None:
    samples = [torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9])]
    batches = make_batches(samples, batch_size=2, pad_token_id=0)
    assert [b["input_ids"].tolist() for b in batches] == [[[3, 4, 5, 6], [7, 8, 9, 0]], [[1, 2]]]
    assert [b["attention_mask"].tolist() for b in batches] == [
        [[1, 1, 1, 1], [1, 1, 1, 0]],
        [[1, 1]],
    ]
    assert all(b["input_ids"].dtype == torch.long for b in batches)


def test_make_batches_is_deterministic_and_keeps_every_sample() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 50, (int(n),), generator=generator) for n in [5, 3, 5, 8, 1, 3]]
    first = make_batches(samples, batch_size=4, pad_token_id=99)
    second = make_batches(samples, batch_size=4, pad_token_id=99)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    kept = sorted(
        tuple(row[mask.bool()].tolist())
        for batch in first
        for row, mask in zip(batch["input_ids"], batch["attention_mask"])
    )
    assert kept == sorted(tuple(s.tolist()) for s in samples)
    assert first[0]["input_ids"][1, 5:].tolist() == [99, 99, 99]


def test_make_batches_without_pad_id_pads_with_zero() -> None:
    batch = make_batches([torch.tensor([4, 5]), torch.tensor([6])], 2, None)[0]
    assert batch["input_ids"].tolist() == [[4, 5], [6, 0]]


def test_padding_token_id_falls_back_to_eos_then_zero() -> None:
    class Tok:
        pad_token_id = None
        eos_token_id = 7

    assert padding_token_id(Tok()) == 7
    Tok.eos_token_id = None
    assert padding_token_id(Tok()) == 0
    Tok.pad_token_id = 3
    assert padding_token_id(Tok()) == 3


def test_make_batches_refuses_a_bad_batch_size() -> None:
    with pytest.raises(ArgumentError, match=r"'batch_size' must be a positive integer \(got 0\)"):
        make_batches([torch.tensor([1])], 0, 0)


def test_hub_probe_answers_from_one_request_and_remembers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.utils

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_module, "_hub_probe_cache", {})
    requests: list[float] = []

    class UnreachableSession:
        def head(self, url, timeout):
            requests.append(timeout)
            raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: UnreachableSession())
    assert hub_is_reachable(timeout=0.5) is False
    assert hub_is_reachable(timeout=0.5) is False
    assert requests == [0.5]
