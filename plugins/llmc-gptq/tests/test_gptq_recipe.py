"""GPTQModifier as recipes see it: found through the entry point, parameters validated."""

from __future__ import annotations

import pytest

from llmc.errors import RecipeError
from llmc.plugins import load_registry
from llmc.recipe import load_recipe, recipe_to_yaml
from llmc_gptq import GPTQModifier


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _recipe(params: str) -> str:
    return f"quant_stage:\n  quant_modifiers:\n    GPTQModifier: {{{params}}}\n"


def test_gptq_plugin_found_through_its_entry_point(registry):
    assert registry.modifiers["GPTQModifier"] == {"gptq": GPTQModifier}
    package, _ = registry.plugins.versions["gptq"]
    assert package == "llmc-gptq"
    recipe = load_recipe("llmc:gptq_w4a16", registry)
    (entry,) = recipe.modifiers
    assert entry.plugin == "gptq" and isinstance(entry.modifier, GPTQModifier)
    assert entry.modifier.scheme == "W4A16" and entry.modifier.ignore == ["lm_head"]


def test_gptq_llm_compressor_recipe_loads_unchanged(registry):
    recipe = load_recipe(
        "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n"
        "      block_size: 128\n      dampening_frac: 0.001\n      actorder: static\n"
        "      config_groups:\n        group_0:\n          targets: [Linear]\n"
        "          input_activations: null\n          output_activations: null\n"
        "          weights: {num_bits: 8, type: int, symmetric: true, strategy: group, group_size: 128}\n",
        registry,
    )
    modifier = recipe.modifiers[0].modifier
    assert (modifier.block_size, modifier.dampening_frac, modifier.actorder) == (128, 0.001, "static")
    (scheme,) = modifier.schemes()
    assert scheme.weights.num_bits == 8 and scheme.weights.actorder == "weight"


@pytest.mark.parametrize(
    ("actorder", "expected"),
    [("null", None), ("none", None), ("false", None), ("weight", "weight"), ("static", "weight"), ("Weight", "weight")],
)
def test_gptq_actorder_spellings(registry, actorder, expected):
    recipe = load_recipe(_recipe(f"scheme: W4A16, actorder: {actorder}"), registry)
    (scheme,) = recipe.modifiers[0].modifier.schemes()
    assert scheme.weights.actorder == expected


def test_gptq_group_actorder_refused_with_the_alternative(registry):
    with pytest.raises(RecipeError, match=r"'actorder' 'group' is not supported: it needs a g_idx tensor .* use actorder 'weight'"):
        load_recipe(_recipe("scheme: W4A16, actorder: group"), registry)


def test_gptq_scheme_that_sets_actorder_keeps_it():
    modifier = GPTQModifier(
        actorder=None,
        config_groups={"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 32, "actorder": "weight"}}},
    )
    assert modifier.schemes()[0].weights.actorder == "weight"


def test_gptq_every_problem_reported_at_once(registry):
    with pytest.raises(RecipeError) as error:
        load_recipe(_recipe("scheme: W4A16, block_size: 0, dampening_frac: 2, actorder: sometimes, true_sequentail: false"), registry)
    text = str(error.value)
    assert "unknown parameter" in text and "true_sequential" in text
    problems = "\n".join(error.value.problems)
    assert "true_sequentail" in problems


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("scheme: W4A16, block_size: 0", r"'block_size' must be a positive integer \(got 0\)"),
        ("scheme: W4A16, dampening_frac: 2", r"'dampening_frac' must be a number between 0 and 1, e.g. 0.01 \(got 2.0\)"),
        ("scheme: W4A16, actorder: sometimes", r"'actorder' must be one of null, 'weight', 'static' \(got 'sometimes'\)"),
        ("scheme: W5A61", r"unknown quantization scheme 'W5A61'; did you mean "),
        ("scheme: UNQUANTIZED", r"quantization scheme 'UNQUANTIZED' quantizes nothing"),
        ("block_size: 64", r"give exactly one of 'scheme' and 'config_groups'"),
    ],
)
def test_gptq_invalid_parameters_are_refused(registry, params, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(params), registry)


def test_gptq_recipe_dump_and_load_round_trip(registry):
    recipe = load_recipe(_recipe("scheme: {W4A16: [re:.*mlp.*], W8A16: [Linear]}, actorder: null, true_sequential: false"), registry)
    again = load_recipe(recipe_to_yaml(recipe, registry), registry)
    assert again.modifiers[0].modifier == recipe.modifiers[0].modifier


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"true_sequential": "no"}, r"'true_sequential' must be true or false \(got 'no'\)"),
        ({"block_size": 0}, r"'block_size' must be a positive integer \(got 0\)"),
        ({"dampening_frac": 1.5}, r"'dampening_frac' must be a number between 0 and 1, e.g. 0.01 \(got 1.5\)"),
    ],
    ids=["bool", "int", "fraction"],
)
def test_gptq_parameters_validated_from_python(kwargs, message):
    from llmc.errors import ArgumentError

    with pytest.raises(ArgumentError, match=message):
        GPTQModifier(scheme="W4A16", **kwargs)


def test_gptq_mistyped_parameter_from_python_names_the_closest():
    from llmc.errors import ArgumentError

    with pytest.raises(ArgumentError, match=r"GPTQModifier has no parameter 'schem'; did you mean 'scheme'\?"):
        GPTQModifier(schem="W4A16")
