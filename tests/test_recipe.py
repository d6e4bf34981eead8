"""Recipes: layouts, validation with every problem at once, overrides and round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.errors import PluginError, RecipeError
from llmc.modifiers import QuantizationModifier
from llmc.plugins import load_registry
from llmc.recipe import load_recipe, recipe_to_yaml

RECIPES_DIR = Path(__file__).parents[1] / "recipes"

LLM_COMPRESSOR_RECIPE = """\
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      targets: Linear
      scheme: W4A16
      ignore: [lm_head]
"""


@pytest.fixture(scope="module")
def registry():
    return load_registry(entry_points=[])


def test_recipe_llm_compressor_layout_loads(registry):
    recipe = load_recipe(LLM_COMPRESSOR_RECIPE, registry)
    (stage,) = recipe.stages
    assert stage.name == "quant_stage"
    (entry,) = stage.modifiers
    assert entry.group == "quant_modifiers" and entry.plugin == "core"
    assert entry.modifier == QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])


def test_recipe_top_level_group_and_list_form(registry):
    recipe = load_recipe(
        "quant_modifiers:\n  - QuantizationModifier: {scheme: W8A16}\n  - QuantizationModifier: {scheme: W4A16, targets: ['re:.*mlp.*']}\n",
        registry,
    )
    assert [e.modifier.scheme for e in recipe.modifiers] == ["W8A16", "W4A16"]
    assert recipe.stages[0].name == "default_stage"


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_every_shipped_file_loads_by_name_and_path(registry, path):
    by_name = load_recipe(f"llmc:{path.stem}", registry)
    by_path = load_recipe(str(path), registry)
    assert by_name.stages == by_path.stages
    assert by_name.modifiers


def test_recipe_unknown_shipped_name_suggests_closest(registry):
    with pytest.raises(RecipeError, match=r"no shipped recipe named 'llmc:w4a61'; did you mean 'w4a16'\?"):
        load_recipe("llmc:w4a61", registry)


def test_recipe_missing_file(registry):
    with pytest.raises(RecipeError, match=r"recipe file 'nope/recipe.yaml' does not exist"):
        load_recipe("nope/recipe.yaml", registry)


def test_recipe_malformed_yaml_names_line(registry, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W4A16\n")
    with pytest.raises(RecipeError, match=r"malformed YAML in .*bad.yaml:\d+"):
        load_recipe(str(path), registry)


def test_recipe_unknown_modifier_did_you_mean_with_line(registry):
    text = "quant_stage:\n  quant_modifiers:\n    QuantizationModifer:\n      scheme: W4A16\n"
    with pytest.raises(RecipeError, match=r"quant_stage.quant_modifiers.QuantizationModifer: .*did you mean 'QuantizationModifier'\? \(<recipe string>:4\)"):
        load_recipe(text, registry)


def test_recipe_missing_plugin_fails_naming_package(registry):
    text = "quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16}\n"
    with pytest.raises(RecipeError, match=r"no installed plugin provides 'GPTQModifier'; install it with: pip install llmc-gptq"):
        load_recipe(text, registry)
    with pytest.raises(RecipeError, match=r"plugin 'gptq' is not installed; install it with: pip install llmc-gptq"):
        load_recipe("plugins: [gptq]\n" + LLM_COMPRESSOR_RECIPE, registry)


def test_recipe_reports_every_problem_at_once(registry):
    text = (
        "quant_stage:\n"
        "  quant_modifiers:\n"
        "    QuantizationModifier:\n"
        "      scheme: W4A16\n"
        "      ignroe: [lm_head]\n"
        "      skip_incompatible: maybe\n"
        "    NoSuchModifier: {}\n"
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(text, registry)
    message = str(caught.value)
    assert "2 problems" in message or "3 problems" in message
    assert "NoSuchModifier" in message
    assert "quant_stage.quant_modifiers.QuantizationModifier.ignroe: unknown parameter; did you mean 'ignore'?" in message
    assert "\n" not in message


def test_recipe_wrong_type_names_field_path(registry):
    text = "quant_modifiers:\n  QuantizationModifier:\n    scheme: W4A16\n    skip_incompatible: [1, 2]\n"
    with pytest.raises(RecipeError, match=r"default_stage.quant_modifiers.QuantizationModifier.skip_incompatible"):
        load_recipe(text, registry)


def test_recipe_bad_preset_names_closest(registry):
    with pytest.raises(RecipeError, match=r"W4A61.*did you mean 'W4A16'"):
        load_recipe("quant_modifiers:\n  QuantizationModifier: {scheme: W4A61}\n", registry)


def test_recipe_yaml_is_loaded_safely(registry, tmp_path):
    marker = tmp_path / "pwned"
    text = f"quant_modifiers: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError):
        load_recipe(text, registry)
    assert not marker.exists()


def test_recipe_args_override_and_validate(registry):
    recipe = load_recipe("llmc:w4a16", registry, recipe_args={"scheme": "W8A16"})
    assert recipe.modifiers[0].modifier.scheme == "W8A16"
    full = "quant_stage.quant_modifiers.QuantizationModifier.ignore"
    recipe = load_recipe("llmc:w4a16", registry, recipe_args={full: ["lm_head", "re:.*down_proj"]})
    assert recipe.modifiers[0].modifier.ignore == ["lm_head", "re:.*down_proj"]
    with pytest.raises(RecipeError, match=r"recipe_args key 'schem' sets nothing.*did you mean 'scheme'\?"):
        load_recipe("llmc:w4a16", registry, recipe_args={"schem": "W8A16"})
    with pytest.raises(RecipeError, match=r"W9A9"):
        load_recipe("llmc:w4a16", registry, recipe_args={"scheme": "W9A9"})


def test_recipe_from_modifier_objects(registry):
    recipe = load_recipe([QuantizationModifier(scheme="W8A8")], registry)
    assert recipe.modifiers[0].plugin == "core"
    with_args = load_recipe(QuantizationModifier(scheme="W8A8"), registry, recipe_args={"scheme": "W4A16"})
    assert with_args.modifiers[0].modifier.scheme == "W4A16"


def test_recipe_stage_selection(registry):
    text = LLM_COMPRESSOR_RECIPE + "other_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W8A8}\n"
    assert [s.name for s in load_recipe(text, registry).stages] == ["quant_stage", "other_stage"]
    only = load_recipe(text, registry, stage="other_stage")
    assert [s.name for s in only.stages] == ["other_stage"]
    with pytest.raises(RecipeError, match=r"no stage 'other_stag'; did you mean 'other_stage'\?"):
        load_recipe(text, registry, stage="other_stag")


def test_recipe_object_not_registered_is_refused(registry):
    from llmc import Modifier

    class Stray(Modifier):
        """Not registered anywhere."""

    with pytest.raises(PluginError, match="not registered by any installed plugin"):
        load_recipe(Stray(), registry)


presets = st.sampled_from(["W4A16", "W4A16_ASYM", "W8A16", "W8A8"])
names = st.sampled_from(["lm_head", "re:.*down_proj", "re:.*\\.0\\..*", "Linear", "model.layers.1.mlp.up_proj"])


@settings(max_examples=40, deadline=None)
@given(scheme=presets, ignore=st.lists(names, max_size=3), skip=st.booleans())
def test_recipe_dump_then_load_gives_same_recipe(scheme, ignore, skip):
    registry = load_registry(entry_points=[])
    modifier = QuantizationModifier(scheme=scheme, ignore=ignore, skip_incompatible=skip)
    recipe = load_recipe([modifier], registry)
    again = load_recipe(recipe_to_yaml(recipe), registry)
    assert again.stages == recipe.stages
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)


def test_recipe_objects_with_recipe_args_keep_plugin_of_ambiguous_name():
    from llmc_test_plugin import RecordInputsModifier, ShadowQuantizationModifier
    from plugin_entry_points import TEST_PLUGIN

    registry = load_registry(entry_points=[TEST_PLUGIN])  # acme offers 'QuantizationModifier' too
    objects = [ShadowQuantizationModifier(), QuantizationModifier(scheme="W8A8"), RecordInputsModifier()]
    recipe = load_recipe(objects, registry, recipe_args={"scheme": "W4A16", "label": "overridden"})
    assert [(e.plugin, type(e.modifier)) for e in recipe.modifiers] == [
        ("acme", ShadowQuantizationModifier), ("core", QuantizationModifier), ("acme", RecordInputsModifier),
    ]
    assert recipe.modifiers[1].modifier.scheme == "W4A16"
    assert recipe.modifiers[2].modifier.label == "overridden"


def test_recipe_args_key_may_qualify_the_modifier_by_plugin():
    from plugin_entry_points import TEST_PLUGIN

    registry = load_registry(entry_points=[TEST_PLUGIN])
    qualified = load_recipe(
        QuantizationModifier(scheme="W4A16"), registry,
        recipe_args={"core.QuantizationModifier.scheme": "W8A16"},
    )
    assert qualified.modifiers[0].modifier == QuantizationModifier(scheme="W8A16")
    # a recipe that wrote the name bare (only core offers it here) takes a qualified key too
    core_only = load_registry(entry_points=[])
    for key in ("core.QuantizationModifier.scheme", "quant_stage.quant_modifiers.core.QuantizationModifier.scheme"):
        recipe = load_recipe(LLM_COMPRESSOR_RECIPE, core_only, recipe_args={key: "W8A8"})
        assert recipe.modifiers[0].modifier.scheme == "W8A8"
    with pytest.raises(RecipeError, match=r"recipe_args key 'acme.QuantizationModifier.scheme' names no modifier"):
        load_recipe(LLM_COMPRESSOR_RECIPE, core_only, recipe_args={"acme.QuantizationModifier.scheme": "W8A8"})


@pytest.mark.parametrize(
    ("stub", "hint"),
    [
        ("zoo:llama2-7b-open_platypus-w4a16", "the closest shipped recipe is 'llmc:w4a16'"),
        ("zoo:nlp/text_generation/llama-7b/pytorch/llmcompressor/w8a8_int8/", "the closest shipped recipe is 'llmc:w8a8'"),
        ("zoo:w4a61", "the closest shipped recipe is 'llmc:w4a16'"),
        ("zoo:llama2-7b-ultrachat200k_llama2_pretrain-pruned50_quantized",
         "shipped recipes: llmc:fp8, llmc:fp8_block, llmc:fp8_dynamic, llmc:mxfp4a16, llmc:mxfp8, "
         "llmc:nvfp4, llmc:nvfp4a16, llmc:w4a16, llmc:w4a16_asym, llmc:w8a16, llmc:w8a8"),
    ],
    ids=["contains-name", "path-stub", "misspelled", "nothing-close"],
)
def test_recipe_sparsezoo_stub_is_refused_naming_a_shipped_recipe(registry, stub, hint):
    with pytest.raises(RecipeError) as caught:
        load_recipe(stub, registry)
    assert str(caught.value) == (
        f"SparseZoo recipe stubs are not supported (got {stub!r}); {hint} (see: llmc recipes), "
        "or pass a recipe YAML file"
    )
