"""Modules reading the same input share one Hessian; it equals the one computed per module."""

from __future__ import annotations

import pytest
import torch
from sparsity_helpers import make_llama

from llmc.context import RunContext
from llmc.errors import CalibrationError
from llmc.hessian import attach_hessian_hooks
from llmc_sparsity.shared_hessians import attach_shared_hessian_hooks


def _layer_and_inputs():
    model = make_llama(hidden=64, layers=1)
    layer = model.model.layers[0]
    modules = {name: module for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, 320, (2, 12), generator=generator) for _ in range(3)]
    return model, modules, ids


def test_sparsity_shared_hessians_equal_per_module_hessians_and_are_shared():
    model, modules, batches = _layer_and_inputs()
    context = RunContext(model=model, device=torch.device("cpu"))
    shared, remove_shared = attach_shared_hessian_hooks(modules, context)
    separate, remove_separate = attach_hessian_hooks(modules, context)
    with torch.no_grad():
        for ids in batches:
            mask = torch.ones_like(ids)
            mask[1, -3:] = 0  # padding is skipped by both
            context.attention_mask = mask
            model(input_ids=ids, attention_mask=mask)
    remove_shared()
    remove_separate()
    for name in modules:
        assert shared[name].tokens == separate[name].tokens == 3 * (24 - 3)
        torch.testing.assert_close(shared[name].H, separate[name].H, rtol=1e-5, atol=1e-6)
    assert shared["self_attn.q_proj"] is shared["self_attn.k_proj"] is shared["self_attn.v_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    distinct = {id(accumulator) for accumulator in shared.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down


def test_sparsity_shared_hessians_refuse_inputs_that_stop_being_shared():
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    context = RunContext(model=torch.nn.Sequential(first, second), device=torch.device("cpu"))
    _, remove = attach_shared_hessian_hooks({"a": first, "b": second}, context)
    x = torch.randn(3, 4)
    first(x)
    second(x)  # shares a's input
    first(torch.randn(3, 4))
    with pytest.raises(CalibrationError, match=r"b shared its input with a on the first calibration batch but not on a later one"):
        second(torch.randn(3, 4))
    remove()
