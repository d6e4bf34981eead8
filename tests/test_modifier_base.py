"""The bases of modifiers and run states: shared fields, validation from Python, hook names."""

from __future__ import annotations

import attrs
import pytest
import torch

from llmc.errors import ArgumentError, PluginError
from llmc.modifier import RunState, TargetedModifier
from llmc.modifiers.quantization import QuantizationModifier
from llmc.pipeline import make_lifecycle


@attrs.frozen(kw_only=True)
class Probe(TargetedModifier):
    pass


def test_targeted_modifier_fields_default_and_accept_one_string():
    assert Probe().targets == ["Linear"] and Probe().ignore == ["lm_head"]
    assert Probe(targets="re:.*proj").targets == ["re:.*proj"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": "re:(unclosed"}, r"'targets' entry 're:\(unclosed' is not a valid regular expression"),
        ({"ignore": [3]}, r"'ignore' must be a list of module names, class names or 're:' patterns \(got \[3\]\)"),
    ],
    ids=["bad-regex", "not-strings"],
)
def test_targeted_modifier_refuses_bad_targets_from_python(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        Probe(**kwargs)


def test_bool_parameters_are_checked_from_python_too():
    with pytest.raises(ArgumentError, match=r"'skip_incompatible' must be true or false \(got 'no'\)"):
        QuantizationModifier(scheme="W4A16", skip_incompatible="no")


def test_run_state_hooks_need_no_marker_and_default_to_nothing():
    calls = []

    class Recording(RunState):
        def llmc_layer_end(self, context, layer_name, layer):
            calls.append(layer_name)

    hook = make_lifecycle([Recording()]).hook
    hook.llmc_layer_end(context=None, layer_name="model.layers.0", layer=torch.nn.Module())
    assert hook.llmc_layer_start(context=None, layer_name="x", layer=torch.nn.Module()) == []
    assert calls == ["model.layers.0"]


def test_misspelled_run_state_hook_is_an_error_naming_the_closest():
    with pytest.raises(PluginError, match=r"Typo.llmc_layer_strat is not an llmc hook; did you mean 'llmc_layer_start'\?"):

        class Typo(RunState):
            def llmc_layer_strat(self, context, layer_name, layer):
                return True
