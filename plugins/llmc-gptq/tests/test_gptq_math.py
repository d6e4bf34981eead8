"""GPTQ on one weight matrix: against round-to-nearest, between the two sweeps, edge cases."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.errors import CalibrationError
from llmc.quantization import (
    PRESET_SCHEMES,
    QuantizationArgs,
    compute_qparams,
    effective_scale,
    fake_quantize,
    global_scale_from_range,
    recover_codes,
    set_quantized_weight_,
    weight_codes,
)
from llmc.quantization.scheme import QuantizationScheme
from llmc.testing import correlated_inputs
from llmc_gptq import gptq_quantize
from llmc_gptq.gptq import (
    gptq_quantize_batch,
    gptq_quantize_prepared,
    prepare_hessian,
    prepare_hessians,
)

SCHEMES = {
    "int4-g32-sym": dict(num_bits=4, symmetric=True, strategy="group", group_size=32),
    "int4-g32-asym": dict(num_bits=4, symmetric=False, strategy="group", group_size=32),
    "int3-g32-sym": dict(num_bits=3, symmetric=True, strategy="group", group_size=32),
    "int8-channel": dict(num_bits=8, symmetric=True, strategy="channel", group_size=None),
    "int4-channel": dict(num_bits=4, symmetric=True, strategy="channel", group_size=None),
    "int4-tensor": dict(num_bits=4, symmetric=True, strategy="tensor", group_size=None),
    # float grids go in as the weights' arguments
    "fp8-channel": dict(args=QuantizationArgs(num_bits=8, type="float", strategy="channel")),
    "fp8-tensor": dict(args=QuantizationArgs(num_bits=8, type="float", strategy="tensor")),
    "fp8-block": dict(
        args=QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=(16, 32))
    ),
    "mxfp4": dict(args=PRESET_SCHEMES["MXFP4A16"].weights),
    "mxfp8": dict(args=PRESET_SCHEMES["MXFP8A16"].weights),
    "nvfp4": dict(args=PRESET_SCHEMES["NVFP4A16"].weights),
}


def _args(scheme: dict) -> QuantizationArgs:
    return scheme["args"] if "args" in scheme else QuantizationArgs(**scheme)


def _rtn(W: torch.Tensor, scheme: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core's round-to-nearest: min-max parameters of W (under NVFP4 the weight's own global
    scale), then rounding."""
    args = _args(scheme)
    global_scale = global_scale_from_range(*torch.aminmax(W)) if args.has_global_scale else None
    scale, zero_point = compute_qparams(W, args, global_scale)
    return fake_quantize(W, effective_scale(scale, global_scale), zero_point, args), scale, zero_point


def _output_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖ / ‖X Wᵀ‖."""
    return (torch.linalg.norm(X @ (W - W_hat).T) / torch.linalg.norm(X @ W.T)).item()


def _hessian(X: torch.Tensor) -> torch.Tensor:
    """``H = 2/N XᵀX``, as llmc.hessian accumulates it."""
    return 2.0 / X.shape[0] * X.T @ X


def _data(rows: int = 48, cols: int = 128, tokens: int = 1024, seed: int = 0):
    generator = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(rows, cols, generator=generator) * 0.05
    X = correlated_inputs(tokens, cols, seed)
    return W, X, _hessian(X)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-groups", "upfront-groups"])
@pytest.mark.parametrize("actorder", [False, True], ids=["columns", "actorder"])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gptq_identity_hessian_equals_round_to_nearest(name, actorder, lazy):
    scheme = SCHEMES[name]
    W, _, _ = _data()
    result = gptq_quantize(
        W, 2.5 * torch.eye(W.shape[1]), **scheme, actorder=actorder, lazy_group_params=lazy, block_size=48
    )
    expected, scale, zero_point = _rtn(W, scheme)
    assert torch.equal(result.weight, expected)
    assert torch.equal(result.scale, scale)
    assert torch.equal(result.zero_point, zero_point)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 24),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 16, 32]),
    block_size=st.integers(1, 70),
    diagonal=st.floats(0.01, 100.0),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_identity_hessian_equals_round_to_nearest_property(
    rows, groups, group_size, block_size, diagonal, symmetric, seed
):
    cols = groups * group_size
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    scheme = dict(num_bits=4, symmetric=symmetric, strategy="group", group_size=group_size)
    result = gptq_quantize(W, diagonal * torch.eye(cols), **scheme, block_size=block_size)
    assert torch.equal(result.weight, _rtn(W, scheme)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("actorder", [False, True], ids=["columns", "actorder"])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gptq_output_error_below_round_to_nearest(name, actorder, seed):
    scheme = SCHEMES[name]
    W, X, H = _data(seed=seed)
    result = gptq_quantize(W, H, **scheme, actorder=actorder)
    rtn, _, _ = _rtn(W, scheme)
    assert _output_error(X, W, result.weight) < _output_error(X, W, rtn)


def test_gptq_reported_errors_match_their_definitions():
    W, X, H = _data()
    result = gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], actorder=True)
    delta = (W - result.weight).double()
    direct = torch.trace(delta @ H.double() @ delta.T).item()
    assert result.hessian_error == pytest.approx(direct, rel=1e-3)
    reference = torch.trace(W.double() @ H.double() @ W.double().T).item()
    assert result.output_error == pytest.approx(direct / reference, rel=1e-3)
    # ‖X ΔWᵀ‖² / ‖X Wᵀ‖² is the same ratio, since H = 2/N XᵀX
    assert result.output_error == pytest.approx(_output_error(X, W, result.weight) ** 2, rel=1e-3)
    measured = gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], actorder=True, output_energy=reference)
    assert measured.output_error == pytest.approx(result.output_error, rel=1e-6)


# The two sweeps (and the two ways of computing group parameters) do the same float32
# operations in the same order, so they agree bit for bit: same codes, same scales, same
# weights. The cases cover every path of the kernels.
AGREEMENT_CASES = {
    "g32-aligned": (dict(SCHEMES["int4-g32-sym"]), dict(block_size=64)),
    "g32-asym": (dict(SCHEMES["int4-g32-asym"]), dict(block_size=32)),
    "channel": (dict(SCHEMES["int8-channel"]), dict(block_size=48)),
    "tensor": (dict(SCHEMES["int4-tensor"]), dict(block_size=48)),
    "upfront-groups-actorder": (dict(SCHEMES["int4-g32-sym"]), dict(actorder=True, lazy_group_params=False)),
    "g32-straddling-blocks": (dict(SCHEMES["int4-g32-sym"]), dict(block_size=20)),
    "g32-actorder": (dict(SCHEMES["int4-g32-sym"]), dict(actorder=True, block_size=48)),
    "g32-asym-actorder": (dict(SCHEMES["int4-g32-asym"]), dict(actorder=True)),
    "int3-g32-actorder": (dict(SCHEMES["int3-g32-sym"]), dict(actorder=True, block_size=128)),
    "bf16-scales": (dict(SCHEMES["int4-g32-sym"]), dict(scale_dtype=torch.bfloat16)),
    "fp8-channel-actorder": (dict(SCHEMES["fp8-channel"]), dict(actorder=True, block_size=48)),
    "fp8-tensor-bf16-scales": (dict(SCHEMES["fp8-tensor"]), dict(scale_dtype=torch.bfloat16)),
    "fp8-block-actorder": (dict(SCHEMES["fp8-block"]), dict(actorder=True, block_size=40)),
    "mxfp4-actorder": (dict(SCHEMES["mxfp4"]), dict(actorder=True, block_size=48)),
    "mxfp8-bf16-scales": (dict(SCHEMES["mxfp8"]), dict(scale_dtype=torch.bfloat16)),
    "nvfp4-actorder": (dict(SCHEMES["nvfp4"]), dict(actorder=True, block_size=20)),
    "nvfp4-upfront-groups": (dict(SCHEMES["nvfp4"]), dict(lazy_group_params=False)),
    "fp16-scales-actorder": (dict(SCHEMES["int4-g32-asym"]), dict(scale_dtype=torch.float16, actorder=True)),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_gptq_numba_and_torch_sweeps_agree(case):
    scheme, options = AGREEMENT_CASES[case]
    W, _, H = _data(rows=64, cols=192 if _args(scheme).strategy != "group" else 128)
    kept = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    for mask in (None, kept):
        fast = gptq_quantize(W, H, **scheme, **options, kept=mask, backend="numba")
        reference = gptq_quantize(W, H, **scheme, **options, kept=mask, backend="torch")
        assert (fast.backend, reference.backend) == ("numba", "torch")
        assert torch.equal(fast.weight, reference.weight)
        assert torch.equal(fast.scale, reference.scale)
        assert torch.equal(fast.zero_point, reference.zero_point)
        assert fast.hessian_error == pytest.approx(reference.hessian_error, rel=1e-5)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("actorder", [False, True], ids=["columns", "actorder"])
def test_gptq_keeps_pruned_weights_exactly_zero(backend, actorder):
    W, X, H = _data()
    kept = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    W = W * kept  # as a pruning step leaves it
    scheme = SCHEMES["int4-g32-asym"]
    result = gptq_quantize(W, H, **scheme, actorder=actorder, kept=kept, backend=backend)
    assert torch.all(result.weight[~kept] == 0)
    assert torch.count_nonzero(result.weight[kept]) > 0.9 * kept.sum()
    rtn = _rtn(W, scheme)[0] * kept  # round-to-nearest of the pruned weight, mask re-applied
    assert _output_error(X, W, result.weight) < _output_error(X, W, rtn)


def test_gptq_result_is_on_its_grid_with_codes_in_range():
    W, _, H = _data()
    for name, scheme in SCHEMES.items():
        args = _args(scheme)
        result = gptq_quantize(W, H, **scheme, actorder=True)
        grid_scale = effective_scale(result.scale, result.global_scale)
        codes = recover_codes(result.weight, grid_scale, result.zero_point, args).float()
        assert args.q_min <= float(codes.min()) and float(codes.max()) <= args.q_max, name
        # each weight sits on the grid of its *original* group: no g_idx needed
        assert torch.equal(fake_quantize(result.weight, grid_scale, result.zero_point, args), result.weight), name


def test_gptq_dead_inputs_give_zero_weights():
    W, X, _ = _data()
    X[:, [5, 70]] = 0.0  # two inputs that never fire
    result = gptq_quantize(W, _hessian(X), **SCHEMES["int4-g32-sym"])
    assert torch.all(result.weight[:, [5, 70]] == 0)
    assert torch.isfinite(result.weight).all()


def test_gptq_repairs_a_hessian_that_is_not_positive_definite(caplog):
    W, X, _ = _data(tokens=64)  # fewer tokens than columns: H is singular
    H = _hessian(X)
    H -= (torch.linalg.eigvalsh(H).min() + 0.03 * torch.diagonal(H).mean()) * torch.eye(H.shape[0])
    assert torch.linalg.eigvalsh(H).min() < 0
    with caplog.at_level(logging.WARNING, logger="llmc.hessian"):
        result = gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], module_name="model.layers.0.mlp.up_proj")
    assert result.damping > 0.01
    assert "model.layers.0.mlp.up_proj needed damping" in caplog.text
    assert torch.isfinite(result.weight).all()


def test_gptq_hopeless_hessian_names_the_module():
    W, _, _ = _data()
    with pytest.raises(
        CalibrationError,
        match=r"Hessian of model.layers.1.self_attn.q_proj is not positive definite after damping 0.01 → 1.28; add calibration samples or raise dampening_frac",
    ):
        gptq_quantize(W, -torch.eye(W.shape[1]), **SCHEMES["int4-g32-sym"], module_name="model.layers.1.self_attn.q_proj")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptq_codes_survive_scales_stored_in_half_precision(dtype):
    W, _, H = _data()
    scheme = QuantizationScheme(weights=_args(SCHEMES["int4-g32-asym"]))
    result = gptq_quantize(W, H, **SCHEMES["int4-g32-asym"], actorder=True, scale_dtype=dtype)
    assert result.scale.dtype == dtype
    chosen = recover_codes(result.weight, result.scale.float(), result.zero_point, scheme.weights)
    module = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(dtype)
    set_quantized_weight_(module, scheme, weight_fake_quantized=result.weight, scale=result.scale, zero_point=result.zero_point)
    assert torch.equal(weight_codes(module), chosen)


def test_gptq_leaves_its_inputs_alone():
    W, _, H = _data()
    W_before, H_before = W.clone(), H.clone()
    gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], actorder=True)
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


def test_gptq_rejects_bad_shapes_and_backends():
    W, _, H = _data()
    with pytest.raises(ValueError, match=r"H has shape \[128, 128\], expected \[64, 64\]"):
        gptq_quantize(W[:, :64], H, **SCHEMES["int4-g32-sym"])
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the 128 columns of weight"):
        gptq_quantize(W, H, num_bits=4, strategy="group", group_size=48)
    with pytest.raises(ValueError, match=r"backend must be one of auto, numba, torch \(got 'cuda'\)"):
        gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gptq_torch_sweep_on_gpu_matches_cpu():
    W, _, H = _data()
    gpu = gptq_quantize(W.cuda(), H.cuda(), **SCHEMES["int4-g32-sym"], actorder=True)
    cpu = gptq_quantize(W, H, **SCHEMES["int4-g32-sym"], actorder=True, backend="torch")
    assert gpu.backend == "torch" and gpu.weight.device.type == "cuda"
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-5 * W.abs().max().item())


BATCH_CASES = {
    "int4-g32": (dict(SCHEMES["int4-g32-sym"]), dict(block_size=48)),
    "int4-g32-asym-actorder": (dict(SCHEMES["int4-g32-asym"]), dict(actorder=True, block_size=48)),
    "int4-g32-upfront-actorder": (dict(SCHEMES["int4-g32-sym"]), dict(actorder=True, lazy_group_params=False)),
    "fp8-block-actorder": (dict(SCHEMES["fp8-block"]), dict(actorder=True, block_size=40)),
    "nvfp4": (dict(SCHEMES["nvfp4"]), dict(block_size=20)),
    "nvfp4-actorder-bf16": (dict(SCHEMES["nvfp4"]), dict(actorder=True, scale_dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_gptq_batch_of_experts_equals_each_expert_alone_bit_for_bit(case, backend):
    """Four experts of one shape, each with its own Hessian (one with a dead input, one that
    needs more damping), mask and global scale: the batched solve gives every expert exactly
    what its own solve gives (on CPU batched LAPACK/BLAS calls run each matrix's routine)."""
    scheme, options = BATCH_CASES[case]
    actorder = options.pop("actorder", False)
    cols = 192 if _args(scheme).strategy != "group" else 128
    weights, hessians, masks = [], [], []
    for expert in range(4):
        W, X, H = _data(rows=48, cols=cols, seed=10 + expert)
        if expert == 1:
            X[:, 7] = 0.0  # an input that never fired
            H = _hessian(X)
        if expert == 2:  # smallest eigenvalue below zero: damping is raised for this one only
            H = H - (torch.linalg.eigvalsh(H).min() + 0.05 * torch.diag(H).mean()) * torch.eye(cols)
        weights.append(W)
        hessians.append(H)
        masks.append(torch.rand(W.shape, generator=torch.Generator().manual_seed(expert)) > 0.3)
    names = [f"mlp.experts.{expert}.up_proj" for expert in range(4)]
    for kept in (None, masks):
        prepared = prepare_hessians(hessians, dampening_frac=0.01, actorder=actorder, module_names=names)
        batch = gptq_quantize_batch(
            weights, prepared, **scheme, **options, kept=kept, backend=backend, module_names=names,
            output_energies=[1.0] * 4,
        )
        for expert in range(4):
            alone = prepare_hessian(hessians[expert], dampening_frac=0.01, actorder=actorder, module_name=names[expert])
            one = gptq_quantize_prepared(
                weights[expert], alone, **scheme, **options, kept=None if kept is None else kept[expert],
                backend=backend, module_name=names[expert], output_energy=1.0,
            )
            got = batch[expert]
            assert got.damping == one.damping and (got.damping > 0.01) == (expert == 2)
            assert torch.equal(got.weight, one.weight), expert
            assert torch.equal(got.scale, one.scale) and torch.equal(got.zero_point, one.zero_point)
            assert (got.global_scale is None) == (one.global_scale is None)
            assert got.global_scale is None or torch.equal(got.global_scale, one.global_scale)
            assert got.hessian_error == one.hessian_error and got.output_error == one.output_error
        assert not torch.equal(batch[0].weight, batch[3].weight)
