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


@attrs.frozen(kw_only=True)
class NeedsQuantizerAfter(TargetedModifier):
    """Takes something from a sibling: refuses a stage without a QuantizationModifier after it."""

    def check_stage(self, stage):
        from llmc.errors import RecipeError

        index = next(i for i, m in enumerate(stage) if m is self)
        if not any(isinstance(m, QuantizationModifier) for m in stage[index + 1:]):
            raise RecipeError("needs a QuantizationModifier after it")

    def start(self, context):
        STAGES_SEEN.append(context.stage_modifiers)
        return RunState()


STAGES_SEEN: list[tuple] = []


def _recipe(*modifiers):
    from llmc.recipe import Recipe, RecipeModifier, RecipeStage

    entries = tuple(RecipeModifier("quant_modifiers", "core", m) for m in modifiers)
    return Recipe(stages=(RecipeStage("quant_stage", entries),))


def test_check_stage_refuses_a_stage_before_the_model_is_loaded():
    from llmc.entrypoints.stages import ONESHOT, check_stage_kinds
    from llmc.errors import RecipeError

    quantizer = QuantizationModifier(scheme="W4A16")
    assert check_stage_kinds(_recipe(NeedsQuantizerAfter(), quantizer), ONESHOT) == ["oneshot"]
    with pytest.raises(RecipeError, match=r"quant_stage\.NeedsQuantizerAfter: needs a QuantizationModifier after it"):
        check_stage_kinds(_recipe(quantizer, NeedsQuantizerAfter()), ONESHOT)


def test_stage_modifiers_are_visible_to_start_while_the_stage_runs():
    from llmc.context import RunContext
    from llmc.entrypoints.stages import run_oneshot_stage

    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    needs, quantizer = NeedsQuantizerAfter(), QuantizationModifier(scheme="W8A8", ignore=[])
    context = RunContext(model=model, device=torch.device("cpu"))
    STAGES_SEEN.clear()
    run_oneshot_stage(_recipe(needs, quantizer).stages[0], model, context, None, None)
    assert STAGES_SEEN == [(needs, quantizer)] and STAGES_SEEN[0][0] is needs
    assert context.stage_modifiers == ()  # cleared once the stage is done
