"""The shared Hessian machinery of GPTQ and SparseGPT."""

from __future__ import annotations

import logging

import pytest
import torch

from llmc.errors import CalibrationError
from llmc.hessian import (
    HessianAccumulator,
    inverse_cholesky_upper,
    inverse_cholesky_upper_batch,
    zero_dead_columns_,
)


def test_hessian_running_mean_equals_direct_sum_and_skips_padding():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8), torch.randn(3, 4, 8)]
    masks = [torch.ones(2, 5, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)]
    masks[1][2, 1:] = 0  # three padded tokens
    accumulator = HessianAccumulator(torch.zeros(8, 8))
    for x, mask in zip(batches, masks):
        accumulator.update(x, mask)
    kept = torch.cat([x.reshape(-1, 8)[m.reshape(-1).bool()] for x, m in zip(batches, masks)])
    expected = 2.0 / kept.shape[0] * kept.T @ kept
    assert accumulator.tokens == kept.shape[0] == 10 + 9
    torch.testing.assert_close(accumulator.H, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cols", [64, 256, 768, 1100])
def test_hessian_from_half_the_products_equals_the_full_one(cols):
    accumulator = HessianAccumulator.for_linear(torch.nn.Linear(cols, 8))
    generator = torch.Generator().manual_seed(cols)
    batches = [torch.randn(2, 7, cols, generator=generator), torch.randn(3, 5, cols, generator=generator)]
    masks = [torch.ones(2, 7, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)]
    masks[1][2, 2:] = 0  # three padded tokens
    for x, mask in zip(batches, masks):
        accumulator.update(x, mask)
    kept = torch.cat([x.reshape(-1, cols)[m.reshape(-1).bool()] for x, m in zip(batches, masks)])
    assert accumulator.tokens == kept.shape[0] == 14 + 12
    torch.testing.assert_close(accumulator.H, 2.0 / kept.shape[0] * kept.T @ kept, rtol=1e-5, atol=1e-5)
    assert torch.equal(accumulator.H, accumulator.H.T)


def test_inverse_cholesky_upper_factorises_damped_inverse():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    H = 2 / 64 * x.T @ x
    upper, frac = inverse_cholesky_upper(H, 0.01, module_name="m")
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(16)
    assert frac == 0.01
    assert torch.equal(upper, torch.triu(upper))
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-4, atol=1e-5)


def test_inverse_cholesky_upper_in_a_given_order_factorises_the_permuted_matrix():
    torch.manual_seed(1)
    x = torch.randn(256, 48)
    x[:, 5] = 0.0  # an input that never fires: zero row and column, taken as H_ii = 1
    H = 2 / 256 * x.T @ x
    order = torch.randperm(48)
    upper, _ = inverse_cholesky_upper(H, 0.01, module_name="m", order=order)
    fixed = H.clone()
    fixed[5, 5] = 1.0
    permuted = fixed[order][:, order]
    damped = permuted + 0.01 * torch.diag(fixed).mean() * torch.eye(48)
    assert torch.equal(upper, torch.triu(upper))
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-4, atol=1e-5)
    assert H[5, 5] == 0.0  # the caller's H is left alone


def test_inverse_cholesky_raises_damping_until_positive_definite(caplog):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    H = 2 / 64 * x.T @ x
    shift = torch.linalg.eigvalsh(H).min() + 0.05 * torch.diag(H).mean()
    H -= shift * torch.eye(16)  # smallest eigenvalue now negative, mean diagonal still positive
    assert torch.linalg.eigvalsh(H).min() < 0
    with caplog.at_level(logging.WARNING, logger="llmc.hessian"):
        upper, frac = inverse_cholesky_upper(H, 0.01, module_name="model.layers.3.mlp.down_proj")
    assert frac > 0.01
    assert "model.layers.3.mlp.down_proj needed damping" in caplog.text
    assert torch.isfinite(upper).all()


def test_inverse_cholesky_gives_up_with_clear_message():
    H = -torch.eye(4)
    with pytest.raises(CalibrationError, match=r"Hessian of q_proj is not positive definite after damping 0.01 → 1.28; add calibration samples or raise dampening_frac"):
        inverse_cholesky_upper(H, 0.01, module_name="q_proj")


@pytest.mark.parametrize("together", [True, False], ids=["batched-calls", "one-by-one"])
@pytest.mark.parametrize("cols", [48, 600], ids=["one-leaf", "halved"])
def test_inverse_cholesky_of_a_batch_equals_each_matrix_alone_bit_for_bit(cols, together, caplog):
    """A batch of Hessians (MoE experts): each factor, damping and warning as alone; exactly
    equal on CPU, where batched LAPACK and BLAS calls run each matrix's own routine."""
    generator = torch.Generator().manual_seed(cols)
    hessians, orders = [], []
    for index in range(4):
        x = torch.randn(cols // 2 + 7 * index, cols, generator=generator)  # rank below cols: singular
        x[:, index] = 0.0  # a different input never fires in each
        hessians.append(2 / x.shape[0] * x.T @ x)
        orders.append(torch.randperm(cols, generator=generator) if index % 2 else None)
    shift = torch.linalg.eigvalsh(hessians[2]).min() + 0.05 * torch.diag(hessians[2]).mean()
    hessians[2] = hessians[2] - shift * torch.eye(cols)  # needs more damping than asked
    names = [f"experts.{index}.down_proj" for index in range(4)]
    with caplog.at_level(logging.WARNING, logger="llmc.hessian"):
        batch, fracs = inverse_cholesky_upper_batch(
            hessians, 0.01, module_names=names, orders=orders, together=together
        )
    assert "experts.2.down_proj needed damping" in caplog.text and "experts.0" not in caplog.text
    assert batch.shape == (4, cols, cols) and fracs[2] > 0.01 and fracs[:2] + fracs[3:] == [0.01] * 3
    for index in range(4):
        alone, frac = inverse_cholesky_upper(hessians[index], 0.01, module_name=names[index], order=orders[index])
        assert frac == fracs[index] and torch.equal(batch[index], alone), index


def test_inverse_cholesky_of_a_batch_names_the_matrix_that_cannot_be_factored():
    with pytest.raises(CalibrationError, match=r"Hessian of experts.1.up_proj is not positive definite"):
        inverse_cholesky_upper_batch(
            [torch.eye(4), -torch.eye(4)], 0.01, module_names=["experts.0.up_proj", "experts.1.up_proj"],
            together=True,
        )


def test_dead_columns_fixed_to_zero_weight_and_unit_curvature():
    H = torch.diag(torch.tensor([2.0, 0.0, 3.0]))
    W = torch.ones(2, 3)
    dead = zero_dead_columns_(H, W)
    assert dead.tolist() == [False, True, False]
    assert W[:, 1].eq(0).all() and H[1, 1] == 1.0


def test_lower_triangular_inverse_by_halves():
    torch.manual_seed(0)
    L = torch.tril(torch.randn(600, 600, dtype=torch.float64)) + 30 * torch.eye(600, dtype=torch.float64)
    from llmc.hessian import lower_triangular_inverse

    torch.testing.assert_close(lower_triangular_inverse(L) @ L, torch.eye(600, dtype=torch.float64), rtol=0, atol=1e-10)


def test_shared_hessian_hooks_share_between_modules_fed_the_same_tensor():
    from llmc.context import RunContext
    from llmc.statistics import StatisticsPass

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 8)

        def forward(self, x, y):
            return self.q(x), self.k(x), self.o(y)

    torch.manual_seed(0)
    block = Block()
    context = RunContext(model=torch.nn.Module(), device=torch.device("cpu"))
    modules = {"q": block.q, "k": block.k, "o": block.o}
    calibration = StatisticsPass(block, modules, context, input_statistic=HessianAccumulator.for_linear, stop="never")
    for _ in range(3):
        block(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    calibration.remove()
    accumulators = {name: group.statistic for group in calibration.groups() for name in group.names}
    assert accumulators["q"] is accumulators["k"] and accumulators["o"] is not accumulators["q"]
    assert accumulators["q"].tokens == 30


def test_hessian_can_take_more_tokens_after_it_was_read():
    torch.manual_seed(3)
    first, second = torch.randn(40, 200), torch.randn(30, 200)
    accumulator = HessianAccumulator(torch.zeros(200, 200), block=64)
    accumulator.update(first)
    torch.testing.assert_close(accumulator.H, 2 / 40 * first.T @ first, rtol=1e-5, atol=1e-5)
    accumulator.update(second)
    both = torch.cat([first, second])
    torch.testing.assert_close(accumulator.H, 2 / 70 * both.T @ both, rtol=1e-5, atol=1e-5)
    assert torch.equal(accumulator.H, accumulator.H.T)


def test_a_released_hessian_frees_its_matrix_and_refuses_to_be_read():
    accumulator = HessianAccumulator.for_linear(torch.nn.Linear(64, 8))
    accumulator.update(torch.randn(2, 16, 64))
    assert accumulator.finalize().shape == (64, 64)
    accumulator.release()
    assert accumulator.S.numel() == 0 and accumulator.tokens == 32
    for read in (accumulator.finalize, accumulator.shard_sums, lambda: accumulator.update(torch.randn(4, 64))):
        with pytest.raises(CalibrationError, match="released after its solve"):
            read()
