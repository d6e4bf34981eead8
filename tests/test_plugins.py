"""Plugin discovery, the modifier registry and the hook contract."""

from __future__ import annotations

import inspect
import logging
import re

import llmc_faulty_plugins
import pluggy
import pytest
from plugin_entry_points import BROKEN_PLUGIN, TEST_PLUGIN, faulty

from llmc import hookimpl, hookspecs
from llmc.errors import PluginError
from llmc.pipeline import make_lifecycle
from llmc.plugins import Registry, check_hooks, load_registry, make_plugin_manager


def test_registry_core_modifiers_without_any_plugin():
    registry = load_registry(entry_points=[])
    plugin, modifier_class = registry.resolve("QuantizationModifier")
    assert plugin == "core"
    assert modifier_class.__name__ == "QuantizationModifier"
    assert {"w4a16", "w4a16_asym", "w8a16", "w8a8", "fp8_dynamic"} <= set(registry.recipes)


def test_registry_third_party_plugin_found_through_entry_point():
    registry = load_registry(entry_points=[TEST_PLUGIN])
    plugin, modifier_class = registry.resolve("RecordInputsModifier")
    assert (plugin, modifier_class.__name__) == ("acme", "RecordInputsModifier")
    assert registry.resolve("acme.RecordInputsModifier")[1] is modifier_class
    assert "acme" in [info.name for info in registry.describe()]


def test_registry_experts_adapters_of_core_and_a_third_party_plugin():
    registry = load_registry(entry_points=[TEST_PLUGIN])
    assert {name: plugin for name, (plugin, _) in registry.experts_adapters.items()} == {
        "gpt_oss": "core", "llama4": "core", "transformers": "core", "acme": "acme",
    }
    assert [adapter.adapter_name for adapter in registry.experts_adapter_classes()][-1] == "acme"
    infos = {info.name: info for info in registry.describe()}
    assert infos["acme"].experts_adapters == ("acme",)
    assert infos["core"].experts_adapters == ("gpt_oss", "llama4", "transformers")


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


# --- broken third-party plugins: recorded and reported, never fatal ---------------------------


@pytest.mark.parametrize(
    ("attribute", "reason"),
    [
        ("TYPO", r"unknown hook 'llmc_register_modifier'; did you mean 'llmc_register_modifiers'\?"),
        ("RAISES", r"llmc_register_modifiers raised RuntimeError: the plugin's license check failed"),
        ("TWICE", r"plugin 'faulty' registers the modifier name 'FaultyModifier' twice "
                  r"\(FaultyModifier and OtherFaultyModifier\)"),
        ("NOT_A_MODIFIER", r"plugin 'faulty' registered <class 'dict'>, which is not a subclass of llmc.Modifier"),
        ("RECIPE_CLASH", r"recipe name 'w4a16' is registered by both plugin 'core' and plugin 'faulty'"),
        ("BAD_ARGUMENT", r"Plugin 'faulty' for hook 'llmc_register_modifiers'; hookimpl definition: "
                         r"_register_with_argument\(registry\); Argument\(s\) \{'registry'\} are declared"),
        ("UNHASHABLE", r"its entry point names an unhashable SimpleNamespace object; name a module"),
        ("ADAPTER_CLASH", r"experts class 'GptOssExperts' is claimed by both experts adapter 'gpt_oss' "
                          r"\(plugin 'core'\) and 'faulty_gpt_oss' \(plugin 'faulty'\)"),
        ("NOT_AN_ADAPTER", r"plugin 'faulty' registered <class 'llmc_faulty_plugins.FaultyModifier'> as an "
                           r"experts adapter; it must be a subclass of llmc.experts_adapters.ExpertsAdapter"),
    ],
    ids=["misspelled-hook", "hook-raises", "name-twice", "not-a-modifier", "recipe-name-taken", "bad-argument",
         "unhashable", "adapter-class-taken", "not-an-adapter"],
)
def test_registry_broken_plugin_recorded_with_reason(attribute, reason):
    registry = load_registry(entry_points=[faulty("faulty", attribute), TEST_PLUGIN])
    assert re.fullmatch(reason + ".*", registry.failed["faulty"])
    assert "faulty" not in registry.plugin_names
    assert "faulty" not in [info.name for info in registry.describe()]
    # nothing of the broken plugin is half-registered, and the other plugins work
    assert "FaultyModifier" not in registry.modifiers
    assert registry.recipes["w4a16"][0] == "core"
    assert registry.resolve("RecordInputsModifier")[0] == "acme"
    with pytest.raises(PluginError, match=r"plugin 'faulty' is installed but failed to load \(" + reason):
        registry.resolve("faulty.FaultyModifier")
    with pytest.raises(PluginError, match=r"plugin 'faulty' is installed but failed to load \(" + reason):
        registry.require_plugin("faulty")


def test_registry_bare_name_of_refused_plugin_gets_the_reason():
    registry = load_registry(entry_points=[faulty("faulty", "TWICE")])
    with pytest.raises(
        PluginError,
        match=r"modifier 'FaultyModifier' is offered by plugin 'faulty', which is installed but failed "
              r"to load \(plugin 'faulty' registers the modifier name 'FaultyModifier' twice",
    ):
        registry.resolve("FaultyModifier")


def test_plugin_manager_two_packages_declaring_one_name_are_both_left_out():
    impostor = faulty("acme", "ACME_IMPOSTOR")
    plugins = make_plugin_manager(entry_points=[TEST_PLUGIN, impostor, BROKEN_PLUGIN])
    assert plugins.failed["acme"] == (
        "two installed packages declare the llmc plugin 'acme' (llmc_test_plugin and "
        "llmc_faulty_plugins); uninstall one"
    )
    assert "broken" in plugins.failed
    assert [name for name, _ in plugins.manager.list_name_plugin()] == ["core"]
    # the same entry point seen twice (a package on the path twice) is no clash
    assert "acme" in make_plugin_manager(entry_points=[TEST_PLUGIN, TEST_PLUGIN]).versions


def test_plugin_manager_refuses_the_core_name():
    plugins = make_plugin_manager(entry_points=[faulty("core", "ACME_IMPOSTOR")])
    assert "declares the plugin name 'core', which is llmc-core's" in plugins.failed["core"]
    assert Registry.from_plugins(plugins).resolve("QuantizationModifier")[0] == "core"


def test_recipe_needing_broken_plugin_fails_with_reason():
    from llmc.errors import RecipeError
    from llmc.recipe import load_recipe

    registry = load_registry(entry_points=[faulty("faulty", "TYPO")])
    with pytest.raises(RecipeError, match=r"plugin 'faulty' is installed but failed to load \(unknown hook 'llmc_register_modifier'; did you mean 'llmc_register_modifiers'\?\)"):
        load_recipe("plugins: [faulty]\nquant_modifiers:\n  QuantizationModifier: {}\n", registry)
    with pytest.raises(RecipeError, match=r"faulty.FaultyModifier: plugin 'faulty' is installed but failed to load \(unknown hook"):
        load_recipe("quant_modifiers:\n  faulty.FaultyModifier: {}\n", registry)


def test_cli_plugins_lists_broken_plugin_with_reason(capsys, monkeypatch):
    import llmc.plugins
    from llmc.cli import main

    real = llmc.plugins.importlib.metadata.entry_points
    monkeypatch.setattr(
        llmc.plugins.importlib.metadata, "entry_points",
        lambda group=None: [faulty("faulty", "RAISES"), BROKEN_PLUGIN] if group == "llmc" else real(group=group),
    )
    assert main(["-q", "plugins"]) == 0
    out = capsys.readouterr().out
    assert "core  (llmc-core" in out
    assert "    experts:   gpt_oss, llama4, transformers\n" in out
    assert "faulty  (failed to load: llmc_register_modifiers raised RuntimeError: the plugin's license check failed)" in out
    assert "broken  (failed to load: ImportError: this plugin needs a package that is not installed)" in out
    assert main(["-q", "recipes"]) == 0  # other commands work
    assert "llmc:w4a16" in capsys.readouterr().out


def test_core_with_misspelled_hook_is_an_error():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(llmc_faulty_plugins.TYPO, name="core")
    with pytest.raises(PluginError, match=r"^plugin 'core' implements an unknown hook 'llmc_register_modifier'; did you mean 'llmc_register_modifiers'\?$"):
        check_hooks(manager, lambda plugin: f"plugin {manager.get_name(plugin)!r}")


# --- run states: a misspelled lifecycle hook fails before any work ---------------------------


class _TypoRun:
    def __init__(self):
        self.calls = []

    @hookimpl
    def llmc_initialize(self, context):
        self.calls.append("initialize")

    @hookimpl
    def llmc_layer_strat(self, context, layer_name, layer):
        self.calls.append("layer_start")


class _TwoTyposRun:
    @hookimpl
    def llmc_layer_strat(self, context, layer_name, layer):
        pass

    @hookimpl
    def llmc_finalise(self, context):
        pass


class _BadArgumentRun:
    @hookimpl
    def llmc_layer_end(self, context, layer_name, module):
        pass


def test_lifecycle_misspelled_hook_names_run_state_and_closest_hook():
    import llmc_test_plugin as plugin

    good = plugin.RecordInputsModifier().start(None)
    with pytest.raises(
        PluginError,
        match=r"^run state test_plugins._TypoRun \(modifier-1\) implements an unknown hook "
              r"'llmc_layer_strat'; did you mean 'llmc_layer_start'\?$",
    ) as caught:
        make_lifecycle([good, _TypoRun()])
    assert caught.value.plugin == "modifier-1"
    with pytest.raises(
        PluginError,
        match=r"unknown hooks 'llmc_finalise' \(did you mean 'llmc_finalize'\?\), "
              r"'llmc_layer_strat' \(did you mean 'llmc_layer_start'\?\)$",
    ):
        make_lifecycle([_TwoTyposRun()])


def test_lifecycle_hook_with_wrong_argument_is_one_line_error():
    with pytest.raises(PluginError, match=r"^run state test_plugins._BadArgumentRun \(modifier-0\) has an invalid hook: .*Argument\(s\) \{'module'\} are declared in the hookimpl") as caught:
        make_lifecycle([_BadArgumentRun()])
    assert "\n" not in str(caught.value)


def test_lifecycle_same_run_state_twice_is_refused():
    import llmc_test_plugin as plugin

    run = plugin.RecordInputsModifier().start(None)
    with pytest.raises(PluginError, match=r"modifier-0 and modifier-1 returned the same run state object"):
        make_lifecycle([run, run])


def test_pipeline_with_misspelled_hook_does_no_work():
    import torch

    from llmc.context import RunContext
    from llmc.pipeline import LayerwisePipeline
    from llmc.testing import build_causal_lm

    model = build_causal_lm("llama", layers=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = _TypoRun()
    with pytest.raises(PluginError, match="llmc_layer_strat"):
        LayerwisePipeline(
            model=model, context=RunContext(model=model, device=torch.device("cpu")),
            lifecycle=make_lifecycle([state]), show_progress=False,
        ).run(None)
    assert state.calls == []
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


# --- LLMC_TRACE_PLUGINS -------------------------------------------------------------------------


def test_trace_plugins_logs_hook_calls(monkeypatch, caplog):
    import llmc_test_plugin as plugin

    monkeypatch.setenv("LLMC_TRACE_PLUGINS", "1")
    caplog.set_level(logging.INFO, logger="llmc.plugins.trace")
    load_registry(entry_points=[TEST_PLUGIN])
    lifecycle = make_lifecycle([plugin.RecordInputsModifier(label="a").start(None), _Answer()])
    assert lifecycle.hook.llmc_layer_start(context=None, layer_name="model.layers.0", layer=_Layer()) == [True, True]
    with pytest.raises(RuntimeError):
        lifecycle.hook.llmc_finalize(context=None)
    messages = [record.getMessage() for record in caplog.records if record.name == "llmc.plugins.trace"]
    assert "[plugins] llmc_register_modifiers() -> acme" in messages
    assert any(m.startswith("[plugins] llmc_register_modifiers returned [[<class 'llmc_test_plugin.") for m in messages)
    assert "[lifecycle] llmc_layer_start(context=None, layer_name='model.layers.0', layer) -> modifier-0, modifier-1" in messages
    assert "[lifecycle] llmc_layer_start returned [True, True]" in messages
    assert "[lifecycle] llmc_finalize raised RuntimeError: finalize failed" in messages


def test_trace_plugins_off_by_default(monkeypatch, caplog):
    monkeypatch.delenv("LLMC_TRACE_PLUGINS", raising=False)
    caplog.set_level(logging.INFO, logger="llmc.plugins.trace")
    make_lifecycle([_Answer()]).hook.llmc_initialize(context=None)
    load_registry(entry_points=[])
    assert not [r for r in caplog.records if r.name == "llmc.plugins.trace"]


class _Layer:
    def register_forward_pre_hook(self, hook, with_kwargs=False):
        return None


class _Answer:
    @hookimpl
    def llmc_layer_start(self, context, layer_name, layer):
        return True

    @hookimpl
    def llmc_finalize(self, context):
        raise RuntimeError("finalize failed")


def test_first_party_plugins_import_only_core_public_api():
    """Whatever a plugin imports from core is exported (``__all__``) and documented in plugins.md."""
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_plugin_docs", root / "scripts" / "gen_plugin_docs.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    problems = []
    for source in sorted((root / "plugins").glob("*/src/**/*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module or node.module.split(".")[0] != "llmc":
                continue
            where = f"{source.relative_to(root)}:{node.lineno}"
            if node.module not in docs.PLUGIN_API_MODULES:
                problems.append(f"{where} imports from {node.module}, not a plugin API module")
                continue
            exported = set(importlib.import_module(node.module).__all__)
            problems += [f"{where} imports {a.name} from {node.module}, not in its __all__" for a in node.names if a.name not in exported]
    assert not problems, "\n".join(problems)
