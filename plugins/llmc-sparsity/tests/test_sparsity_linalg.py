"""The one-factorisation inverse Cholesky agrees with core's, retries damping the same way."""

from __future__ import annotations

import logging

import pytest
import torch

from llmc.errors import CalibrationError
from llmc.hessian import inverse_cholesky_upper as core_inverse_cholesky_upper
from llmc_sparsity.linalg import inverse_cholesky_upper, lower_triangular_inverse


@pytest.mark.parametrize("n", [1, 7, 256, 300, 700])
def test_sparsity_lower_triangular_inverse(n):
    generator = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(n, n, generator=generator, dtype=torch.float64)) + 3 * n**0.5 * torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(lower_triangular_inverse(L) @ L, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [16, 600])
def test_sparsity_inverse_cholesky_matches_core(n):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4 * n, n, generator=generator) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=generator) / n**0.5)
    H = 2 / x.shape[0] * x.T @ x
    before = H.clone()
    ours, frac = inverse_cholesky_upper(H, 0.01, module_name="m")
    theirs, core_frac = core_inverse_cholesky_upper(H, 0.01, module_name="m")
    assert frac == core_frac == 0.01 and torch.equal(H, before)
    assert torch.equal(ours, torch.triu(ours)) and torch.all(torch.diagonal(ours) > 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_sparsity_inverse_cholesky_retries_damping_like_core(caplog):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    H = 2 / 64 * x.T @ x
    H -= (torch.linalg.eigvalsh(H).min() + 0.05 * torch.diag(H).mean()) * torch.eye(16)
    with caplog.at_level(logging.WARNING, logger="llmc.hessian"):
        upper, frac = inverse_cholesky_upper(H, 0.01, module_name="model.layers.3.mlp.down_proj")
    assert frac == core_inverse_cholesky_upper(H, 0.01, module_name="x")[1] > 0.01
    assert "model.layers.3.mlp.down_proj needed damping" in caplog.text
    with pytest.raises(CalibrationError, match=r"Hessian of q_proj is not positive definite after damping 0.01 → 1.28; add calibration samples or raise dampening_frac"):
        inverse_cholesky_upper(-torch.eye(4), 0.01, module_name="q_proj")
