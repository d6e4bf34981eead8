"""Plugins that are broken in the ways an installed third-party package can be.

Each is a module object named by a fake entry point (``llmc_faulty_plugins:TYPO``); none of them may
stop the other plugins from working.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import ClassVar

import attrs

from llmc import Modifier, hookimpl
from llmc.experts_adapters import ExpertsAdapter


@attrs.frozen(kw_only=True)
class FaultyModifier(Modifier):
    """A modifier that only a broken plugin offers."""


@attrs.frozen(kw_only=True)
class OtherFaultyModifier(Modifier):
    """Registered under the same name as FaultyModifier."""

    modifier_name: ClassVar[str] = "FaultyModifier"


@hookimpl
def llmc_register_modifier():  # misspelled: the hookspec is llmc_register_modifiers
    return [FaultyModifier]


@hookimpl(specname="llmc_register_modifiers")
def _register_faulty():
    return [FaultyModifier]


@hookimpl(specname="llmc_register_modifiers")
def _register_raising():
    raise RuntimeError("the plugin's license check failed")


@hookimpl(specname="llmc_register_modifiers")
def _register_twice():
    return [FaultyModifier, OtherFaultyModifier]


@hookimpl(specname="llmc_register_modifiers")
def _register_not_a_modifier():
    return [dict]


@hookimpl(specname="llmc_register_recipes")
def _register_core_recipe_name():
    return {"w4a16": "/nonexistent/w4a16.yaml"}


@hookimpl(specname="llmc_register_modifiers")
def _register_with_argument(registry):  # the hookspec takes no argument
    return [FaultyModifier]


class ClashingExpertsAdapter(ExpertsAdapter):
    """Claims the experts class core's gpt_oss adapter handles."""

    adapter_name = "faulty_gpt_oss"
    experts_classes = ("GptOssExperts",)


@hookimpl(specname="llmc_register_experts_adapters")
def _register_clashing_adapter():
    return [ClashingExpertsAdapter]


@hookimpl(specname="llmc_register_experts_adapters")
def _register_not_an_adapter():
    return [FaultyModifier]


def _plugin(name: str, **hooks: object) -> ModuleType:
    """A module object holding the given hook implementations, as a plugin's module would."""
    module = ModuleType(f"llmc_faulty_plugins.{name}")
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    return module


TYPO = _plugin("typo", llmc_register_modifier=llmc_register_modifier)
RAISES = _plugin("raises", llmc_register_modifiers=_register_raising)
TWICE = _plugin("twice", llmc_register_modifiers=_register_twice)
NOT_A_MODIFIER = _plugin("not_a_modifier", llmc_register_modifiers=_register_not_a_modifier)
RECIPE_CLASH = _plugin(
    "recipe_clash", llmc_register_modifiers=_register_faulty, llmc_register_recipes=_register_core_recipe_name
)
BAD_ARGUMENT = _plugin("bad_argument", llmc_register_modifiers=_register_with_argument)
# A second package declaring the plugin name 'acme' (the first is llmc_test_plugin).
ACME_IMPOSTOR = _plugin("acme_impostor", llmc_register_modifiers=_register_faulty)
# Not a module: a namespace object, which cannot be hashed (pluggy needs hashable plugins).
UNHASHABLE = SimpleNamespace(llmc_register_modifiers=_register_faulty)
ADAPTER_CLASH = _plugin(
    "adapter_clash", llmc_register_modifiers=_register_faulty, llmc_register_experts_adapters=_register_clashing_adapter
)
NOT_AN_ADAPTER = _plugin(
    "not_an_adapter", llmc_register_modifiers=_register_faulty, llmc_register_experts_adapters=_register_not_an_adapter
)
