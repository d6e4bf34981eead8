"""``calibration_precision``: forwards autocast to a lower precision, nothing else changes dtype."""

from __future__ import annotations

import torch

from llmc import hookimpl, oneshot
from llmc.context import RunContext
from llmc.hessian import HessianAccumulator
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
