"""The distillation losses on their own: zero at the teacher, positive away from it, padding ignored."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc_distill.losses import COMPARISONS, kl_divergence, mse, square_head


def _pair(seed: int = 0, shape=(2, 5, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=generator) * 3
    return teacher + 0.5 * torch.randn(shape, generator=generator), teacher


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_distill_loss_is_zero_at_the_teacher_and_positive_away(name):
    student, teacher = _pair()
    assert COMPARISONS[name](teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert COMPARISONS[name](student, teacher).item() > 1e-3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.1, 10.0))
def test_distill_kl_of_a_distribution_with_itself_is_zero(seed, temperature):
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(seed)) * 5
    assert kl_divergence(logits, logits.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits + 1.0, logits, temperature=temperature).item() == pytest.approx(0.0, abs=1e-5)  # softmax shift-invariance


def test_distill_kl_matches_torch_kl_div_times_temperature_squared():
    student, teacher = _pair()
    tau = 2.0
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student / tau, -1).reshape(-1, 16), torch.log_softmax(teacher / tau, -1).reshape(-1, 16),
        log_target=True, reduction="batchmean",
    ) * tau**2
    torch.testing.assert_close(kl_divergence(student, teacher, temperature=tau), expected)


def test_distill_square_head_is_mse_over_teacher_energy_and_scale_free():
    student, teacher = _pair()
    torch.testing.assert_close(square_head(student, teacher), mse(student, teacher) / teacher.pow(2).mean())
    torch.testing.assert_close(square_head(100 * student, 100 * teacher), square_head(student, teacher))


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_distill_loss_ignores_padded_tokens(name):
    student, teacher = _pair()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    changed = student.clone()
    changed[1, 3:] = 1e3  # only padded positions differ
    compare = COMPARISONS[name]
    torch.testing.assert_close(compare(changed, teacher, mask=mask), compare(student, teacher, mask=mask))
