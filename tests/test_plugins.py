"""Plugin discovery, the modifier registry and the hook contract."""

from __future__ import annotations

import inspect

import pytest
from plugin_entry_points import BROKEN_PLUGIN, TEST_PLUGIN

from llmc import hookspecs
from llmc.errors import PluginError
from llmc.pipeline import make_lifecycle
from llmc.plugins import Registry, load_registry, make_plugin_manager


def test_registry_core_modifiers_without_any_plugin():
    registry = load_registry(entry_points=[])
    plugin, modifier_class = registry.resolve("QuantizationModifier")
    assert plugin == "core"
    assert modifier_class.__name__ == "QuantizationModifier"
    assert {"w4a16", "w4a16_asym", "w8a16", "w8a8"} <= set(registry.recipes)


def test_registry_third_party_plugin_found_through_entry_point():
    registry = load_registry(entry_points=[TEST_PLUGIN])
    plugin, modifier_class = registry.resolve("RecordInputsModifier")
    assert (plugin, modifier_class.__name__) == ("acme", "RecordInputsModifier")
    assert registry.resolve("acme.RecordInputsModifier")[1] is modifier_class
    assert "acme" in [info.name for info in registry.describe()]


def test_registry_name_offered_twice_needs_qualified_name():
    registry = load_registry(entry_points=[TEST_PLUGIN])
    with pytest.raises(PluginError, match=r"more than one plugin; write 'acme.QuantizationModifier' or 'core.QuantizationModifier'"):
        registry.resolve("QuantizationModifier")
    assert registry.resolve("core.QuantizationModifier")[0] == "core"
    assert registry.resolve("acme.QuantizationModifier")[1].__name__ == "ShadowQuantizationModifier"


def test_registry_refuses_same_name_twice_from_one_plugin():
    plugins = make_plugin_manager(entry_points=[])
    registry = Registry(plugins)
    from llmc.modifiers import QuantizationModifier

    registry._add_modifier("core", QuantizationModifier)
    with pytest.raises(PluginError, match="registers the modifier name 'QuantizationModifier' twice"):
        registry._add_modifier("core", QuantizationModifier)


def test_registry_missing_first_party_modifier_names_package():
    registry = load_registry(entry_points=[])
    with pytest.raises(PluginError, match=r"no installed plugin provides 'GPTQModifier'; install it with: pip install llmc-gptq"):
        registry.resolve("GPTQModifier")
    with pytest.raises(PluginError, match=r"plugin 'sparsity' is not installed; install it with: pip install llmc-sparsity"):
        registry.resolve("sparsity.SparseGPTModifier")


def test_registry_typo_gets_closest_name():
    registry = load_registry(entry_points=[])
    with pytest.raises(PluginError, match=r"did you mean 'QuantizationModifier'\?"):
        registry.resolve("QuantisationModifier")


def test_registry_broken_plugin_is_reported_not_fatal():
    registry = load_registry(entry_points=[BROKEN_PLUGIN, TEST_PLUGIN])
    assert "broken" in registry.plugins.failed
    assert registry.resolve("RecordInputsModifier")[0] == "acme"
    with pytest.raises(PluginError, match=r"plugin 'broken' is installed but failed to load \(ImportError"):
        registry.resolve("broken.Anything")


def test_plugins_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LLMC_DISABLE_PLUGINS", "acme")
    registry = load_registry(entry_points=[TEST_PLUGIN])
    assert "acme" not in registry.plugin_names
    assert "core" in registry.plugin_names


def test_lifecycle_calls_follow_recipe_order():
    import llmc_test_plugin as plugin

    plugin.EVENTS.clear()
    first = plugin.RecordInputsModifier(label="first").start(None)
    second = plugin.RecordInputsModifier(label="second").start(None)
    lifecycle = make_lifecycle([first, second])
    lifecycle.hook.llmc_initialize(context=None)
    lifecycle.hook.llmc_finalize(context=None)
    assert plugin.EVENTS == [
        ("first", "initialize"), ("second", "initialize"),
        ("first", "finalize"), ("second", "finalize"),
    ]


@pytest.mark.parametrize("name", [n for n in dir(hookspecs) if n.startswith("llmc_")])
def test_hookspec_is_documented_and_listed(name):
    spec = getattr(hookspecs, name)
    assert inspect.getdoc(spec) and len(inspect.getdoc(spec)) > 80
    assert name in hookspecs.REGISTRATION_HOOKS + hookspecs.CHECKPOINT_HOOKS + hookspecs.LIFECYCLE_HOOKS + hookspecs.TRAINING_HOOKS


def test_every_registered_modifier_has_docstring_and_unique_name():
    registry = load_registry(entry_points=[])
    for name, owners in registry.modifiers.items():
        assert len(owners) == 1, name
        for modifier_class in owners.values():
            assert inspect.getdoc(modifier_class), name


def test_plugin_docs_are_generated_from_hookspecs():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_plugin_docs", root / "scripts" / "gen_plugin_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "plugins.md").read_text() == module.render(), "run scripts/gen_plugin_docs.py"
