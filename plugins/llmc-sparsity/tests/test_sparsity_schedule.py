"""The cubic gradual-pruning schedule and its update points."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc_sparsity.schedule import cubic_sparsity, last_update_point, scheduled_sparsity


def test_sparsity_cubic_schedule_values():
    assert cubic_sparsity(0.0, 0.1, 0.7, 0.0, 2.0) == pytest.approx(0.1)
    assert cubic_sparsity(2.0, 0.1, 0.7, 0.0, 2.0) == pytest.approx(0.7)
    # halfway: final + (init − final) · (1/2)³
    assert cubic_sparsity(1.0, 0.1, 0.7, 0.0, 2.0) == pytest.approx(0.7 - 0.6 / 8)
    assert cubic_sparsity(5.0, 0.1, 0.7, 0.0, 2.0) == pytest.approx(0.7)  # clamped after end
    assert cubic_sparsity(-1.0, 0.1, 0.7, 0.0, 2.0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("epoch", "point"),
    [(0.0, None), (0.49, None), (0.5, 0.5), (0.74, 0.5), (0.75, 0.75), (1.2, 1.0), (1.9, 1.75),
     (2.0, 2.0), (3.5, 2.0), (0.3 / 0.4, 0.75)],
)
def test_sparsity_update_points(epoch, point):
    found = last_update_point(epoch, 0.5, 2.0, 0.25)
    assert found == (None if point is None else pytest.approx(point))


@settings(max_examples=60, deadline=None)
@given(
    init=st.floats(0, 0.5),
    final=st.floats(0.5, 0.95),
    start=st.floats(0, 2),
    length=st.floats(0.1, 3),
    update=st.floats(0.05, 1),
    epochs=st.lists(st.floats(0, 6), min_size=2, max_size=20).map(sorted),
)
def test_sparsity_schedule_never_decreases_and_ends_at_final(init, final, start, length, update, epochs):
    end = start + length
    previous = -1.0
    for epoch in epochs:
        scheduled = scheduled_sparsity(
            epoch, init_sparsity=init, final_sparsity=final, start=start, end=end, update=update
        )
        if scheduled is None:
            assert epoch < start + 1e-9
            continue
        point, sparsity = scheduled
        assert start - 1e-9 <= point <= epoch + 1e-9
        assert init - 1e-9 <= sparsity <= final + 1e-9
        assert sparsity >= previous - 1e-12
        previous = sparsity
    _, last = scheduled_sparsity(end, init_sparsity=init, final_sparsity=final, start=start, end=end, update=update)
    assert last == pytest.approx(final)
