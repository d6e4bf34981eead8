"""Core's calibration-statistics layer: input groups, padding, early stops, stages, merging."""

from __future__ import annotations

import pytest
import torch

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.hessian import HessianAccumulator
from llmc.pipeline import StopLayerForward
from llmc.statistics import (
    LayerCalibration,
    Statistic,
    StatisticsPass,
    calibration_stages,
    real_tokens,
    same_tensor,
)


class Block(torch.nn.Module):
    """q and k read one tensor, o another: two input groups."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 8)
        self.after = 0  # forwards that got past the last Linear
        self.share = True  # whether k reads the very tensor q reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.q(x) + self.k(x if self.share else x.clone()).sum()
        out = out + self.o(out)
        self.after += 1
        return out


def _context() -> RunContext:
    return RunContext(model=torch.nn.Module(), device=torch.device("cpu"))


def _modules(block: Block) -> dict[str, torch.nn.Linear]:
    return {"q": block.q, "k": block.k, "o": block.o}


def _run_batches(block: Block, batches: list[torch.Tensor]) -> None:
    """What the pipeline's calibration pass does: each batch through, a stopped one skipped."""
    for x in batches:
        try:
            block(x)
        except StopLayerForward:
            pass


def test_real_tokens_drops_padding_only_when_the_mask_fits():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert real_tokens(x, mask).shape == (3, 4)
    assert real_tokens(x, None).shape == (6, 4)
    assert real_tokens(x[:1], mask).shape == (3, 4)  # a routed subset: the mask cannot name its tokens


def test_empty_inputs_are_the_same_tensor_only_when_they_are_one_object():
    # two MoE experts that no token reached get distinct empty inputs at the same address
    a, b = torch.empty(0, 8), torch.empty(0, 8)
    assert a.data_ptr() == b.data_ptr() and not same_tensor(a, b)
    assert same_tensor(a, a)
    x = torch.randn(4, 8)
    assert same_tensor(x, x.view(4, 8)) and not same_tensor(x, x.clone())


def test_hessian_is_a_statistic_and_merging_parts_equals_the_whole():
    torch.manual_seed(0)
    first, second = torch.randn(30, 96), torch.randn(50, 96)
    whole, part_a, part_b = (HessianAccumulator(torch.zeros(96, 96), block=32) for _ in range(3))
    whole.update(torch.cat([first, second]))
    part_a.update(first)
    part_b.update(second)
    _ = part_a.H  # a read part (mirrored, scaled) merges as well as a fresh one
    part_a.merge(part_b)
    assert isinstance(whole, Statistic)
    assert part_a.tokens == whole.tokens == 80
    torch.testing.assert_close(part_a.finalize(), whole.finalize(), rtol=1e-5, atol=1e-6)


def test_groups_follow_the_data_flow_and_padding_is_skipped():
    torch.manual_seed(0)
    block = Block()
    context = _context()
    collector = StatisticsPass(block, _modules(block), context, input_statistic=HessianAccumulator.for_linear, stop="never")
    context.attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for _ in range(2):
        block(torch.randn(2, 5, 8))
    layout = collector.remove()
    assert layout == [["q", "k"], ["o"]]
    groups = collector.groups()
    assert [g.names for g in groups] == [["q", "k"], ["o"]]
    assert [g.statistic.tokens for g in groups] == [16, 16]


def test_a_module_that_never_ran_forms_a_last_group_without_statistic():
    block = Block()
    unused = torch.nn.Linear(8, 8)
    block.unused = unused
    collector = StatisticsPass(
        block, {**_modules(block), "unused": unused}, _context(), input_statistic=HessianAccumulator.for_linear
    )
    block(torch.randn(1, 3, 8))
    assert collector.remove()[-1] == ["unused"]
    assert collector.groups()[-1].statistic is None


def test_sharing_that_breaks_on_a_later_batch_is_an_error():
    block = Block()
    StatisticsPass(block, _modules(block), _context(), input_statistic=HessianAccumulator.for_linear, stop="never")
    x = torch.randn(1, 3, 8)
    block(x)  # q and k share x
    block.share = False
    with pytest.raises(CalibrationError, match=r"k shared its input with q on the first calibration batch but not on a later one"):
        block(x)


@pytest.mark.parametrize("foreign", [False, True], ids=["alone", "another-hook"])
def test_batches_stop_early_only_when_no_other_hook_is_on_the_layer(foreign):
    block = Block()
    if foreign:
        block.o.register_forward_hook(lambda *_: None)
    collector = StatisticsPass(block, _modules(block), _context(), input_statistic=HessianAccumulator.for_linear)
    _run_batches(block, [torch.randn(1, 3, 8) for _ in range(3)])
    collector.remove()
    # the first batch always runs whole (the groups are found on it)
    assert block.after == (3 if foreign else 1)


def test_output_statistics_keep_the_batch_running_until_the_output_exists():
    block = Block()

    class Count:
        tokens = 0

        def update(self, x, mask=None):
            self.tokens += x.reshape(-1, x.shape[-1]).shape[0]

        def merge(self, other):
            self.tokens += other.tokens

        def finalize(self):
            return self.tokens

    collector = StatisticsPass(
        block, _modules(block), _context(), input_statistic=HessianAccumulator.for_linear,
        output_statistic=lambda module: Count() if module is block.o else None, stop="always",
    )
    _run_batches(block, [torch.randn(1, 3, 8) for _ in range(2)])
    collector.remove()
    (_, group_o) = collector.groups()
    assert group_o.outputs["o"].finalize() == 6  # o's output was reached on both batches


def test_true_sequential_stages_one_group_each_and_two_for_many_groups(monkeypatch):
    layout = [["a"], ["b"], ["c"]]
    assert calibration_stages(layout, False, "layer") == [{0, 1, 2}]
    assert calibration_stages(layout, True, "layer") == [{0}, {1}, {2}]
    monkeypatch.setattr("llmc.statistics.MAX_STAGES", 2)
    assert calibration_stages(layout, True, "layer") == [{0}, {1, 2}]


def test_layer_calibration_reruns_the_layer_between_stages_and_remembers_the_layout():
    torch.manual_seed(0)
    block = Block()
    context = _context()
    batches = [torch.randn(1, 4, 8) for _ in range(2)]

    def forward_layer() -> None:
        _run_batches(block, batches)

    context.forward_layer = forward_layer
    calibration = LayerCalibration(input_statistic=HessianAccumulator.for_linear, true_sequential=True)
    solved: list[list[str]] = []
    for _ in range(2):  # the second layer of the same kind reuses the layout
        assert calibration.start(context, "layer", block, {f"layer.{n}": m for n, m in _modules(block).items()})
        forward_layer()
        calibration.finish(context, "layer", block, lambda groups: solved.extend(g.names for g in groups))
    assert solved == [["layer.q", "layer.k"], ["layer.o"]] * 2
    assert calibration.layouts == {("Block", ("q", "k", "o")): [["q", "k"], ["o"]]}
    assert not calibration.start(context, "layer", block, {})
