"""``calibration_precision``: forwards autocast to a lower precision, nothing else changes dtype."""

from __future__ import annotations

import logging

import pytest
import torch

from llmc import hookimpl, oneshot
from llmc.args import ModelArguments
from llmc.context import RunContext
from llmc.errors import ArgumentError
from llmc.hessian import HessianAccumulator
from llmc.models import calibration_dtype, cpu_computes_fast_in
from llmc.pipeline import LayerwisePipeline, make_lifecycle
from llmc.testing import build_causal_lm


class _Probe:
    """Records the dtype of every Linear output during the calibration passes, and Hessians."""

    def __init__(self) -> None:
        self.output_dtypes: set[torch.dtype] = set()
        self.hessians: list[HessianAccumulator] = []
        self._handles: list = []

    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                accumulator = HessianAccumulator.for_linear(module)
                self.hessians.append(accumulator)
                self._handles.append(module.register_forward_hook(self._record(accumulator)))
        return True

    def _record(self, accumulator):
        def hook(module, args, output):
            self.output_dtypes.add(output.dtype)
            accumulator.update(args[0])

        return hook

    @hookimpl
    def llmc_layer_end(self, context, layer_name, layer):
        assert not torch.is_autocast_enabled("cpu")  # modifiers solve outside the autocast
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _run(compute_dtype):
    model = build_causal_lm(layers=2)
    probe = _Probe()
    context = RunContext(model=model, device=torch.device("cpu"), compute_dtype=compute_dtype)
    batches = [{"input_ids": torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([probe]), show_progress=False).run(batches)
    return model, probe


def test_bfloat16_calibration_autocasts_forwards_and_keeps_hessians_and_weights_float32():
    model, probe = _run(torch.bfloat16)
    assert probe.output_dtypes == {torch.bfloat16}
    assert all(acc.H.dtype == torch.float32 and acc.tokens == 3 * 2 * 16 for acc in probe.hessians)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")


def test_default_calibration_computes_in_the_model_dtype_and_hessians_stay_close():
    _, full = _run(None)
    _, low = _run(torch.bfloat16)
    assert full.output_dtypes == {torch.float32}
    # The first Linear reads the normed embeddings, computed in float32 either way; the inputs
    # of later ones went through bf16 products: close to the float32 ones, not equal.
    differences = [
        ((exact.H - approximate.H).abs().max() / exact.H.abs().max()).item()
        for exact, approximate in zip(full.hessians, low.hessians)
    ]
    assert differences[0] == 0.0
    assert max(differences) > 0.0
    assert max(differences) < 0.05


def test_oneshot_calibration_precision_leaves_the_checkpoint_dtype(tmp_path, tiny_model_dir):
    result = oneshot(
        model=str(tiny_model_dir), recipe="llmc:w8a16", dataset="llmc:stdlib-docs",
        num_calibration_samples=4, max_seq_length=32, calibration_precision="bfloat16",
        output_dir=str(tmp_path / "out"),
    )
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}


_AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False,
         "avx512_bw": False, "avx_ne_convert": False, "avx512_fp16": False, "amx_fp16": False}  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "features", "fast"),
    [
        (torch.bfloat16, {}, False),
        (torch.float16, {}, False),
        (torch.bfloat16, {"avx512_bf16": True}, True),
        (torch.bfloat16, {"amx_bf16": True}, True),
        (torch.bfloat16, {"avx512_bw": True}, True),
        (torch.float16, {"avx512_bw": True}, False),
        (torch.float16, {"avx512_fp16": True}, True),
        (torch.float32, {}, True),
        (torch.bfloat16, {"architecture": "aarch64"}, True),
    ],
)
def test_cpu_computes_fast_in_reads_the_matrix_features_of_x86_cpus(dtype, features, fast):
    assert cpu_computes_fast_in(dtype, {**_AVX2, **features}) is fast


@pytest.mark.parametrize(("features", "warned"), [({}, True), ({"avx512_bf16": True}, False)])
def test_bfloat16_passes_on_a_cpu_without_bf16_instructions_are_warned_of(monkeypatch, caplog, features, warned):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**_AVX2, **features})
    model = build_causal_lm(layers=1).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="llmc.models"):
        assert calibration_dtype(ModelArguments(model=model), model, torch.device("cpu")) is None
        # the same model on no particular device, or autocast from float32: only a CPU's passes
        calibration_dtype(ModelArguments(model=model), model)
    messages = [r.getMessage() for r in caplog.records if r.name == "llmc.models"]
    if warned:
        assert len(messages) == 1
        assert "bfloat16 on a CPU without bfloat16 matrix instructions" in messages[0]
        assert "precision='float32'" in messages[0]
    else:
        assert messages == []


def test_bfloat16_autocast_of_a_float32_model_on_a_slow_cpu_points_back_to_auto(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(_AVX2))
    model = build_causal_lm(layers=1)
    with caplog.at_level(logging.WARNING, logger="llmc.models"):
        dtype = calibration_dtype(ModelArguments(model=model, calibration_precision="bfloat16"), model, torch.device("cpu"))
    assert dtype is torch.bfloat16
    [message] = [r.getMessage() for r in caplog.records if r.name == "llmc.models"]
    assert "calibration_precision='auto'" in message and "precision='float32'" not in message


@pytest.mark.parametrize("given", ["precision", "loaded"], ids=["precision-bfloat16", "bfloat16-model"])
def test_float32_passes_of_a_bfloat16_model_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, given):
    out = tmp_path / "out"
    if given == "precision":  # refused with the arguments, before the model loads
        model, settings = str(tiny_model_dir), {"precision": "bfloat16"}
    else:  # its dtype is known once it is loaded
        model = build_causal_lm(layers=1).to(torch.bfloat16)
        settings = {"tokenizer": str(tiny_model_dir)}
    with pytest.raises(ArgumentError) as raised:
        oneshot(
            model=model, recipe="llmc:w8a16", dataset="llmc:stdlib-docs", num_calibration_samples=4,
            max_seq_length=32, calibration_precision="float32", output_dir=str(out), **settings,
        )
    message = str(raised.value)
    assert "\n" not in message
    assert "calibration_precision='float32'" in message and "bfloat16 model" in message
    assert "precision='float32'" in message.split(";")[1]
    assert not out.exists() or not any(out.iterdir())
