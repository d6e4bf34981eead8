"""Model and tokenizer loading: presets, dtypes, devices and one-line errors offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers

from llmc import models as models_module
from llmc.args import ModelArguments
from llmc.errors import ArgumentError, ModelLoadError
from llmc.models import (
    default_device,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "src" / "llmc" / "assets" / "tiny-llama"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    from llmc.testing import build_causal_lm

    path = tmp_path_factory.mktemp("tiny-llama-bf16")
    build_causal_lm("llama", hidden=64).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- paths


def test_resolve_model_path_keeps_hub_names_and_existing_paths(tiny_model_dir: Path) -> None:
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)


@pytest.mark.parametrize("name", ["./x", "/no/such/model", "~/no-such-model-dir", "a/b/c"])
def test_resolve_model_path_reports_a_missing_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match=rf"^model path '{name}' does not exist$"):
        resolve_model_path(name)


def test_resolve_model_path_with_an_existing_parent_is_a_path(tmp_path: Path) -> None:
    name = str(tmp_path / "missing-model")
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        resolve_model_path(name)


def test_resolve_model_path_refuses_a_file(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"is a file; pass the folder that holds config.json"):
        resolve_model_path(tiny_model_dir / "config.json")


def test_unknown_model_preset_suggests_the_closest() -> None:
    with pytest.raises(
        ModelLoadError, match=r"unknown model preset 'llmc:tiny-lama'; did you mean"
    ):
        resolve_model_path("llmc:tiny-lama")


@pytest.mark.skipif(
    not (EMBEDDED_MODEL / "config.json").exists(), reason="embedded model not built yet"
)
def test_embedded_tiny_llama_loads_by_name() -> None:
    assert Path(resolve_model_path("llmc:tiny-llama")) == EMBEDDED_MODEL
    args = ModelArguments(model="llmc:tiny-llama", device="cpu")
    model = load_model(args)
    tokenizer = load_tokenizer(args, model)
    assert isinstance(model, transformers.LlamaForCausalLM)
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] >= len(tokenizer) - 1


# --------------------------------------------------------------------------- load errors


def test_load_model_missing_path_is_one_line() -> None:
    with pytest.raises(ModelLoadError, match=r"^model path './no-such-model' does not exist$"):
        load_model(ModelArguments(model="./no-such-model"))


def test_load_model_unreachable_hub_name_fails_fast_with_one_line() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelArguments(model="meta-llama/X"))
    assert time.perf_counter() - started < 5
    assert str(caught.value) == (
        "cannot load model 'meta-llama/X' from the Hugging Face hub (offline or unreachable); "
        "pass a local directory with model=path/to/model"
    )


def test_load_model_unreachable_hub_without_offline_setting_uses_the_cache_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(models_module, "hub_is_reachable", lambda: False)
    seen = {}

    def fake_config(name, **kwargs):
        seen.update(kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    with pytest.raises(
        ModelLoadError, match=r"^cannot load model 'org/model' from the Hugging Face"
    ):
        load_model(ModelArguments(model="org/model"))
    assert seen["local_files_only"] is True


def test_load_model_folder_without_config_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"^cannot load model '{tmp_path}': .*config.json"):
        load_model(ModelArguments(model=str(tmp_path)))


def test_load_model_without_a_model_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError, match=r"^no model given; pass model="):
        load_model(ModelArguments())


def test_compressed_tensors_checkpoint_without_the_package_says_what_to_install(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    real_find_spec = models_module.importlib.util.find_spec
    monkeypatch.setattr(
        models_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "compressed_tensors" else real_find_spec(name, *a),
    )
    with pytest.raises(
        ModelLoadError,
        match=r"is a compressed-tensors checkpoint but the compressed-tensors package is not "
        r"installed; pip install compressed-tensors",
    ):
        load_model(ModelArguments(model=str(tmp_path)))


# --------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
def test_load_model_precision_sets_the_dtype(tiny_model_dir: Path, precision, dtype) -> None:
    model = load_model(ModelArguments(model=str(tiny_model_dir), precision=precision, device="cpu"))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not model.training


def test_load_model_auto_precision_keeps_the_checkpoint_dtype(bf16_model_dir: Path) -> None:
    model = load_model(ModelArguments(model=str(bf16_model_dir), device="cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_model_passes_trust_remote_code_through(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ModelArguments(model=str(tiny_model_dir), device="cpu"))
    load_model(ModelArguments(model=str(tiny_model_dir), device="cpu", trust_remote_code=True))
    assert seen == [False, True]


def test_load_model_returns_a_model_object_untouched(caplog) -> None:
    from llmc.testing import build_causal_lm

    model = build_causal_lm("llama", hidden=64)
    assert load_model(ModelArguments(model=model)) is model
    with caplog.at_level("WARNING", logger="llmc.models"):
        same = load_model(ModelArguments(model=model, precision="bfloat16"))
    assert same is model and next(model.parameters()).dtype == torch.float32
    assert "precision='bfloat16' is not applied to a model object" in caplog.text


def test_default_device_prefers_the_request_then_cuda_then_cpu() -> None:
    assert default_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device(None).type == expected
    with pytest.raises(ArgumentError, match=r"'device' must be a torch device .*got 'gpu0'"):
        default_device("gpu0")


# --------------------------------------------------------------------------- tokenizer


def test_load_tokenizer_from_the_model_folder_and_from_a_model_object(tiny_model_dir: Path) -> None:
    args = ModelArguments(model=str(tiny_model_dir))
    tokenizer = load_tokenizer(args)
    assert tokenizer("Return the number")["input_ids"]
    model = load_model(ModelArguments(model=str(tiny_model_dir), device="cpu"))
    from_object = load_tokenizer(ModelArguments(model=model), model)
    assert from_object.get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_returns_a_tokenizer_object_as_is(tokenizer) -> None:
    assert load_tokenizer(ModelArguments(model="anything", tokenizer=tokenizer)) is tokenizer


def test_load_tokenizer_of_an_anonymous_model_object_asks_for_a_path() -> None:
    from llmc.testing import build_causal_lm

    model = build_causal_lm("llama", hidden=64)
    with pytest.raises(ArgumentError, match=r"cannot tell where the tokenizer is"):
        load_tokenizer(ModelArguments(model=model), model)


def test_load_tokenizer_unreachable_hub_name_is_one_line() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_tokenizer(ModelArguments(model="org/some-model"))
    assert str(caught.value) == (
        "cannot load tokenizer 'org/some-model' from the Hugging Face hub (offline or unreachable); "
        "pass a local directory with tokenizer=path/to/tokenizer"
    )


def test_loaded_weights_are_compressed_in_place_unless_tied(tmp_path: Path, tokenizer) -> None:
    from llmc.quantization import preset_scheme, quantize_linear_
    from llmc.testing import build_causal_lm

    tied = build_causal_lm(layers=1)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    model = load_model(ModelArguments(model=str(tmp_path / "tied")))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not getattr(model.lm_head.weight, models_module.EXCLUSIVE, False)

    q_proj = model.model.layers[0].self_attn.q_proj
    assert getattr(q_proj.weight, models_module.EXCLUSIVE)
    parameter, pointer = q_proj.weight, q_proj.weight.data_ptr()
    quantize_linear_(q_proj, preset_scheme("W4A16"))
    assert q_proj.weight is parameter and q_proj.weight.data_ptr() == pointer  # written in place
    assert q_proj.weight.unique().numel() > 1
