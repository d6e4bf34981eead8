"""Finding plugins and the modifiers and recipes they offer.

Plugins are Python packages that declare an entry point in group ``llmc``; the entry-point name
is the plugin's name. Core's own modifiers register through the same hook under the name
``core``, so a third-party package is a peer of the first-party ones, with nothing in core to
change. Set ``LLMC_DISABLE_PLUGINS=name,name`` (or ``all``) to leave plugins out when debugging.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pluggy

from llmc import hookspecs
from llmc.errors import PluginError, did_you_mean
from llmc.modifier import Modifier

__all__ = [
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_PACKAGES",
    "LoadedPlugins",
    "PluginInfo",
    "Registry",
    "load_registry",
    "make_plugin_manager",
]

logger = logging.getLogger("llmc.plugins")

ENTRY_POINT_GROUP = "llmc"
CORE_PLUGIN = "core"

# Where a first-party modifier lives, so a recipe naming it can say what to install.
FIRST_PARTY_PACKAGES: dict[str, str] = {
    "GPTQModifier": "llmc-gptq",
    "SparseGPTModifier": "llmc-sparsity",
    "WandaPruningModifier": "llmc-sparsity",
    "MagnitudePruningModifier": "llmc-sparsity",
    "ConstantPruningModifier": "llmc-sparsity",
    "OutputDistillationModifier": "llmc-distill",
    "LayerDistillationModifier": "llmc-distill",
}
FIRST_PARTY_PLUGINS: dict[str, str] = {
    "gptq": "llmc-gptq",
    "sparsity": "llmc-sparsity",
    "distill": "llmc-distill",
}


@attrs.frozen
class PluginInfo:
    """One plugin as ``llmc plugins`` shows it."""

    name: str
    package: str
    version: str
    modifiers: tuple[str, ...]
    recipes: tuple[str, ...]


def _disabled_plugins() -> set[str]:
    value = os.environ.get("LLMC_DISABLE_PLUGINS", "")
    return {part.strip() for part in value.split(",") if part.strip()}


@attrs.frozen
class LoadedPlugins:
    """A plugin manager with, per plugin, its package and version, and the plugins that failed."""

    manager: pluggy.PluginManager
    versions: dict[str, tuple[str, str]]
    failed: dict[str, str]


def make_plugin_manager(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> LoadedPlugins:
    """Build a plugin manager with core and every installed (or given) plugin registered.

    Built on demand, never at import time, so tests can pass fake entry points and a broken
    plugin cannot break ``import llmc``. A plugin that fails to import is reported in the log
    and left out; a recipe that needs it then says so.
    """
    from llmc import builtin

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin, name=CORE_PLUGIN)
    failed: dict[str, str] = {}
    versions = {CORE_PLUGIN: ("llmc-core", _version("llmc-core"))}
    disabled = _disabled_plugins()
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in entry_points:
        name = entry_point.name
        if "all" in disabled or name in disabled:
            logger.info("plugin %r disabled by LLMC_DISABLE_PLUGINS", name)
            continue
        if manager.has_plugin(name):
            raise PluginError(
                f"two installed packages declare the llmc plugin {name!r}; uninstall one",
                plugin=name,
            )
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break core
            logger.warning("plugin %r could not be loaded: %s", name, error)
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        manager.register(plugin, name=name)
        dist = getattr(entry_point, "dist", None)
        package = dist.metadata["Name"] if dist is not None else _module_name(plugin)
        version = dist.version if dist is not None else _version(package)
        versions[name] = (package, version)
    return LoadedPlugins(manager, versions, failed)


def _module_name(plugin: Any) -> str:
    return plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@attrs.define
class Registry:
    """Modifier and recipe names, each with the plugin that provides it."""

    plugins: LoadedPlugins
    # bare modifier name -> {plugin name: class}
    modifiers: dict[str, dict[str, type[Modifier]]] = attrs.field(factory=dict)
    recipes: dict[str, tuple[str, Path]] = attrs.field(factory=dict)

    @classmethod
    def from_plugins(cls, plugins: LoadedPlugins) -> Registry:
        registry = cls(plugins)
        manager = plugins.manager
        # Each implementation is called on its own so the registry knows who provided what.
        for impl in manager.hook.llmc_register_modifiers.get_hookimpls():
            for modifier_class in impl.function() or ():
                registry._add_modifier(impl.plugin_name, modifier_class)
        for impl in manager.hook.llmc_register_recipes.get_hookimpls():
            for name, path in (impl.function() or {}).items():
                registry._add_recipe(impl.plugin_name, name, Path(path))
        return registry

    def _add_modifier(self, plugin: str, modifier_class: type) -> None:
        if not (isinstance(modifier_class, type) and issubclass(modifier_class, Modifier)):
            raise PluginError(
                f"plugin {plugin!r} registered {modifier_class!r}, which is not a subclass of "
                "llmc.Modifier",
                plugin=plugin,
            )
        name = modifier_class.recipe_name()
        owners = self.modifiers.setdefault(name, {})
        if plugin in owners:
            raise PluginError(
                f"plugin {plugin!r} registers the modifier name {name!r} twice "
                f"({owners[plugin].__qualname__} and {modifier_class.__qualname__})",
                plugin=plugin,
            )
        owners[plugin] = modifier_class

    def _add_recipe(self, plugin: str, name: str, path: Path) -> None:
        if name in self.recipes:
            other = self.recipes[name][0]
            raise PluginError(
                f"recipe name {name!r} is registered by both plugin {other!r} and plugin "
                f"{plugin!r}",
                plugin=plugin,
            )
        self.recipes[name] = (plugin, path)

    @property
    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.plugins.manager.list_name_plugin()]

    def resolve(self, reference: str) -> tuple[str, type[Modifier]]:
        """The (plugin, class) a recipe means by ``Name`` or ``plugin.Name``.

        Raises ``PluginError`` saying what to install, what was probably meant, or, for a
        name two plugins offer, which qualified names to choose from.
        """
        plugin, _, name = reference.rpartition(".")
        owners = self.modifiers.get(name)
        if plugin:
            if plugin not in self.plugin_names:
                raise PluginError(self._missing_plugin_message(plugin), plugin=plugin)
            if not owners or plugin not in owners:
                offered = [n for n, o in self.modifiers.items() if plugin in o]
                raise PluginError(
                    f"plugin {plugin!r} does not provide a modifier {name!r}"
                    f"{did_you_mean(name, offered)}",
                    plugin=plugin,
                )
            return plugin, owners[plugin]
        if not owners:
            raise PluginError(self._missing_modifier_message(name))
        if len(owners) > 1:
            choices = " or ".join(f"'{p}.{name}'" for p in sorted(owners))
            raise PluginError(
                f"modifier {name!r} is provided by more than one plugin; write {choices}"
            )
        (only_plugin, modifier_class), = owners.items()
        return only_plugin, modifier_class

    def _missing_plugin_message(self, plugin: str) -> str:
        if plugin in self.plugins.failed:
            reason = self.plugins.failed[plugin]
            return f"plugin {plugin!r} is installed but failed to load ({reason})"
        if plugin in FIRST_PARTY_PLUGINS:
            package = FIRST_PARTY_PLUGINS[plugin]
            return f"plugin {plugin!r} is not installed; install it with: pip install {package}"
        return f"no installed plugin is named {plugin!r}{did_you_mean(plugin, self.plugin_names)}"

    def _missing_modifier_message(self, name: str) -> str:
        package = FIRST_PARTY_PACKAGES.get(name)
        if package is not None:
            return (
                f"no installed plugin provides {name!r}; install it with: pip install {package}"
            )
        hint = did_you_mean(name, self.modifiers)
        return f"no installed plugin provides a modifier named {name!r}{hint}"

    def require_plugin(self, plugin: str) -> None:
        """Fail early when a recipe lists a plugin it needs that is not installed."""
        if plugin not in self.plugin_names:
            raise PluginError(self._missing_plugin_message(plugin), plugin=plugin)

    def describe(self) -> list[PluginInfo]:
        versions = self.plugins.versions
        infos = []
        for name in sorted(self.plugin_names, key=lambda n: (n != CORE_PLUGIN, n)):
            package, version = versions.get(name, (name, "unknown"))
            modifiers = tuple(sorted(m for m, owners in self.modifiers.items() if name in owners))
            recipes = tuple(sorted(r for r, (p, _) in self.recipes.items() if p == name))
            infos.append(PluginInfo(name, package, version, modifiers, recipes))
        return infos


def load_registry(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> Registry:
    """The registry of everything installed plugins offer (built fresh on each call)."""
    return Registry.from_plugins(make_plugin_manager(entry_points))
