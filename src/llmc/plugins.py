"""Finding plugins and the modifiers and recipes they offer.

Plugins are Python packages that declare an entry point in group ``llmc``; the entry-point name
is the plugin's name. Core's own modifiers register through the same hook under the name
``core``, so a third-party package is a peer of the first-party ones, with nothing in core to
change.

A broken third-party plugin never breaks another command: a plugin whose import fails, that
implements a hook no hookspec declares (a misspelling such as ``llmc_register_modifier``), whose
registration hook raises or registers something invalid, or whose name two packages declare, is
left out and remembered with the reason. ``llmc plugins`` lists it with that reason, and a recipe
that needs it fails with it.

Environment variables, for debugging:

* ``LLMC_DISABLE_PLUGINS=name,name`` (or ``all``) leaves plugins out.
* ``LLMC_TRACE_PLUGINS=1`` logs every hook call, of the plugin manager (registration hooks) and
  of each run's lifecycle manager (the modifiers' run states), with the names of its arguments
  (and the values of plain ones such as ``layer_name``), the implementations called and what
  they returned or raised, on the ``llmc.plugins.trace`` logger at level INFO (the CLI shows
  INFO unless ``-q``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pluggy

from llmc import hookspecs
from llmc.errors import PluginError, did_you_mean, names_with_closest
from llmc.experts_adapters import ExpertsAdapter
from llmc.modifier import Modifier

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_PACKAGES",
    "TRACE_ENV",
    "LoadedPlugins",
    "PluginInfo",
    "Registry",
    "check_hooks",
    "load_registry",
    "make_plugin_manager",
    "trace_hook_calls",
    "unknown_hooks",
    "unknown_hooks_text",
    "validation_text",
]

logger = logging.getLogger("llmc.plugins")
trace_logger = logging.getLogger("llmc.plugins.trace")

ENTRY_POINT_GROUP = "llmc"
CORE_PLUGIN = "core"
DISABLE_ENV = "LLMC_DISABLE_PLUGINS"
TRACE_ENV = "LLMC_TRACE_PLUGINS"
HOOK_NAMES = (*hookspecs.REGISTRATION_HOOKS, *hookspecs.LIFECYCLE_HOOKS, *hookspecs.TRAINING_HOOKS)

# Where a first-party modifier lives, so a recipe naming it can say what to install.
FIRST_PARTY_PACKAGES: dict[str, str] = {
    "GPTQModifier": "llmc-gptq",
    "SparseGPTModifier": "llmc-sparsity",
    "WandaPruningModifier": "llmc-sparsity",
    "MagnitudePruningModifier": "llmc-sparsity",
    "ConstantPruningModifier": "llmc-sparsity",
    "OutputDistillationModifier": "llmc-distill",
    "AWQModifier": "llmc-awq",
    "SmoothQuantModifier": "llmc-awq",
}
FIRST_PARTY_PLUGINS: dict[str, str] = {
    "gptq": "llmc-gptq",
    "sparsity": "llmc-sparsity",
    "distill": "llmc-distill",
    "awq": "llmc-awq",
}


@attrs.frozen
class PluginInfo:
    """One plugin as ``llmc plugins`` shows it."""

    name: str
    package: str
    version: str
    modifiers: tuple[str, ...]
    recipes: tuple[str, ...]
    experts_adapters: tuple[str, ...] = ()


def _disabled_plugins() -> set[str]:
    value = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in value.split(",") if part.strip()}


# --- hook checks and tracing, shared with the lifecycle manager of a run (pipeline.py) --------


def unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no hookspec declares (misspellings, usually)."""
    return sorted(
        caller.name
        for caller in manager.get_hookcallers(plugin) or ()
        if not caller.has_spec()
        and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
    )


def unknown_hooks_text(names: Sequence[str]) -> str:
    """``unknown hook 'llmc_layer_strat'; did you mean 'llmc_layer_start'?`` for one or more."""
    if len(names) == 1:
        return f"unknown hook {names[0]!r}{did_you_mean(names[0], HOOK_NAMES)}"
    return f"unknown hooks {names_with_closest(names, HOOK_NAMES)}"


def validation_text(error: pluggy.PluginValidationError) -> str:
    """pluggy's multi-line validation message on one line."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def check_hooks(manager: pluggy.PluginManager, describe: Callable[[object], str]) -> None:
    """pluggy's ``check_pending``: a hook implemented but never declared is an error.

    Raises a one-line ``PluginError`` naming the implementer (``describe(plugin)``), the unknown
    hook and the closest valid hook name.
    """
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        names = unknown_hooks(manager, error.plugin) or [str(error)]
        raise PluginError(
            f"{describe(error.plugin)} implements an {unknown_hooks_text(names)}",
            plugin=manager.get_name(error.plugin),
        ) from None


_short_repr = reprlib.Repr()
_short_repr.maxstring = 80
_short_repr.maxother = 120
_PLAIN = (str, int, float, bool, type(None))


def trace_hook_calls(manager: pluggy.PluginManager, label: str) -> Callable[[], None] | None:
    """With ``LLMC_TRACE_PLUGINS=1``, log every hook call of ``manager``; returns the undo.

    Each call is logged before it runs (hook, argument names, implementations in call order)
    and after (its results, or the exception it raised). Plain argument values (strings,
    numbers) are shown; tensors, models and contexts only by name.
    """
    if os.environ.get(TRACE_ENV, "").strip().lower() in ("", "0", "false", "no", "off"):
        return None

    def arguments(kwargs: Mapping[str, object]) -> str:
        return ", ".join(
            f"{name}={_short_repr.repr(value)}" if isinstance(value, _PLAIN) else name
            for name, value in kwargs.items()
        )

    def before(hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, object]) -> None:
        called = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no implementation"
        trace_logger.info("[%s] %s(%s) -> %s", label, hook_name, arguments(kwargs), called)

    def after(
        outcome: Any, hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, object]
    ) -> None:
        error = outcome.exception
        if error is not None:
            trace_logger.info("[%s] %s raised %s: %s", label, hook_name, type(error).__name__, error)
        else:
            result = _short_repr.repr(outcome.get_result())
            trace_logger.info("[%s] %s returned %s", label, hook_name, result)

    return manager.add_hookcall_monitoring(before, after)


# --- the plugin manager ------------------------------------------------------------------------


@attrs.frozen
class LoadedPlugins:
    """A plugin manager with, per plugin, its package and version, and the plugins that failed."""

    manager: pluggy.PluginManager
    versions: dict[str, tuple[str, str]]
    failed: dict[str, str]


def _package_of(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.metadata["Name"] if dist is not None else entry_point.module


def make_plugin_manager(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> LoadedPlugins:
    """Build a plugin manager with core and every installed (or given) plugin registered.

    Built on demand, never at import time, so tests can pass fake entry points and a broken
    plugin cannot break ``import llmc``. A third-party plugin that cannot be used (its import
    fails, it implements an unknown hook or a hook with arguments the hookspec lacks, two
    packages declare its name) is logged, left out and recorded in ``failed`` with the reason;
    a recipe that needs it then says so. A problem in core itself raises ``PluginError``.
    """
    from llmc import builtin

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin, name=CORE_PLUGIN)
    failed: dict[str, str] = {}
    versions = {CORE_PLUGIN: ("llmc-core", _version("llmc-core"))}

    def refuse(name: str, reason: str) -> None:
        logger.warning("plugin %r is left out: %s", name, reason)
        failed[name] = reason

    disabled = _disabled_plugins()
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    declared: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for entry_point in entry_points:
        same_name = declared.setdefault(entry_point.name, [])
        if all(other.value != entry_point.value for other in same_name):
            same_name.append(entry_point)  # the same target declared twice is no clash
    for name, candidates in declared.items():
        if "all" in disabled or name in disabled:
            logger.info("plugin %r disabled by %s", name, DISABLE_ENV)
            continue
        packages = [_package_of(entry_point) for entry_point in candidates]
        if name == CORE_PLUGIN:
            refuse(name, f"{' and '.join(packages)} declares the plugin name 'core', which is "
                         "llmc-core's; the package must rename its entry point")
            continue
        if len(candidates) > 1:
            refuse(name, f"two installed packages declare the llmc plugin {name!r} "
                         f"({' and '.join(packages)}); uninstall one")
            continue
        (entry_point,) = candidates
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break core
            refuse(name, _exception_text(error))
            continue
        try:
            hash(plugin)
        except TypeError:
            refuse(name, f"its entry point names an unhashable {type(plugin).__name__} object; "
                         "name a module (or another hashable object)")
            continue
        try:
            manager.register(plugin, name=name)
        except pluggy.PluginValidationError as error:  # a hook with arguments the spec lacks
            refuse(name, validation_text(error))
            continue
        except ValueError:  # the same module is already registered under another name
            other = manager.get_name(plugin)
            refuse(name, f"its entry point names the same object as plugin {other!r}")
            continue
        unknown = unknown_hooks(manager, plugin)
        if unknown:
            manager.unregister(plugin)
            refuse(name, unknown_hooks_text(unknown))
            continue
        dist = getattr(entry_point, "dist", None)
        package = dist.metadata["Name"] if dist is not None else _module_name(plugin)
        version = dist.version if dist is not None else _version(package)
        versions[name] = (package, version)
    check_hooks(manager, lambda plugin: f"plugin {manager.get_name(plugin)!r}")
    trace_hook_calls(manager, "plugins")
    return LoadedPlugins(manager, versions, failed)


def _exception_text(error: BaseException) -> str:
    """``ImportError: no module named x``, on one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _module_name(plugin: Any) -> str:
    return plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@attrs.define
class Registry:
    """Modifier, recipe and experts adapter names, each with the plugin that provides it.

    ``refused`` holds the plugins whose registration hooks raised or registered something
    invalid, with the reason; ``failed`` adds those the plugin manager left out.
    """

    plugins: LoadedPlugins
    # bare modifier name -> {plugin name: class}
    modifiers: dict[str, dict[str, type[Modifier]]] = attrs.field(factory=dict)
    recipes: dict[str, tuple[str, Path]] = attrs.field(factory=dict)
    # adapter name -> (plugin name, class), in registration order (core's first)
    experts_adapters: dict[str, tuple[str, type[ExpertsAdapter]]] = attrs.field(factory=dict)
    refused: dict[str, str] = attrs.field(factory=dict)
    # modifier name -> refused plugin that offered it, so a recipe naming it gets the reason
    refused_offers: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_plugins(cls, plugins: LoadedPlugins) -> Registry:
        """Call each plugin's registration hooks on their own, so who provided what is known.

        A plugin's offers are taken whole or not at all: when its hook raises or it registers
        something invalid, everything it registered is dropped and it is recorded in
        ``refused`` (a problem in core raises ``PluginError``).
        """
        registry = cls(plugins)
        for name, plugin in plugins.manager.list_name_plugin():
            modifiers = {key: dict(owners) for key, owners in registry.modifiers.items()}
            recipes = dict(registry.recipes)
            adapters = dict(registry.experts_adapters)
            offered: list[str] = []
            try:
                registry._register(name, plugin, offered)
            except Exception as error:
                if name == CORE_PLUGIN:
                    raise
                registry.modifiers, registry.recipes, registry.experts_adapters = modifiers, recipes, adapters
                reason = str(error) if isinstance(error, PluginError) else _exception_text(error)
                logger.warning("plugin %r is left out: %s", name, reason)
                registry.refused[name] = reason
                for modifier_name in offered:
                    registry.refused_offers.setdefault(modifier_name, name)
        return registry

    def _register(self, name: str, plugin: object, offered: list[str]) -> None:
        offers = self._call_registration(name, plugin, "llmc_register_modifiers") or ()
        for modifier_class in offers:
            if isinstance(modifier_class, type) and issubclass(modifier_class, Modifier):
                offered.append(modifier_class.recipe_name())
            self._add_modifier(name, modifier_class)
        recipes = self._call_registration(name, plugin, "llmc_register_recipes") or {}
        for recipe_name, path in recipes.items():
            self._add_recipe(name, recipe_name, Path(path))
        for adapter in self._call_registration(name, plugin, "llmc_register_experts_adapters") or ():
            self._add_experts_adapter(name, adapter)

    def _call_registration(self, name: str, plugin: object, hook_name: str) -> Any:
        """One plugin's implementation of a registration hook, through the (traced) manager."""
        manager = self.plugins.manager
        caller = getattr(manager.hook, hook_name)
        if not any(impl.plugin is plugin for impl in caller.get_hookimpls()):
            return None
        others = [other for _, other in manager.list_name_plugin() if other is not plugin]
        try:
            results = manager.subset_hook_caller(hook_name, remove_plugins=others)()
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(f"{hook_name} raised {_exception_text(error)}", plugin=name) from error
        return results[0] if results else None

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

    def _add_experts_adapter(self, plugin: str, adapter: type) -> None:
        if not (isinstance(adapter, type) and issubclass(adapter, ExpertsAdapter)) or not adapter.adapter_name:
            raise PluginError(
                f"plugin {plugin!r} registered {adapter!r} as an experts adapter; it must be a subclass "
                "of llmc.experts_adapters.ExpertsAdapter with a non-empty adapter_name",
                plugin=plugin,
            )
        name = adapter.adapter_name
        if name in self.experts_adapters:
            other = self.experts_adapters[name][0]
            raise PluginError(
                f"experts adapter name {name!r} is registered by both plugin {other!r} and plugin {plugin!r}",
                plugin=plugin,
            )
        for other_plugin, other in self.experts_adapters.values():
            shared = sorted(set(adapter.experts_classes) & set(other.experts_classes))
            if shared:
                raise PluginError(
                    f"experts class {shared[0]!r} is claimed by both experts adapter {other.adapter_name!r} "
                    f"(plugin {other_plugin!r}) and {name!r} (plugin {plugin!r})",
                    plugin=plugin,
                )
        self.experts_adapters[name] = (plugin, adapter)

    def experts_adapter_classes(self) -> list[type[ExpertsAdapter]]:
        """The registered experts adapters, in registration order (``llmc.moe``)."""
        return [adapter for _, adapter in self.experts_adapters.values()]

    @property
    def plugin_names(self) -> list[str]:
        """The plugins in use: registered, and not refused at registration."""
        return [
            name for name, _ in self.plugins.manager.list_name_plugin() if name not in self.refused
        ]

    @property
    def failed(self) -> dict[str, str]:
        """Every plugin left out, with the reason: at load time, then at registration."""
        return {**self.plugins.failed, **self.refused}

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
        if plugin in self.failed:
            return f"plugin {plugin!r} is installed but failed to load ({self.failed[plugin]})"
        if plugin in FIRST_PARTY_PLUGINS:
            package = FIRST_PARTY_PLUGINS[plugin]
            return f"plugin {plugin!r} is not installed; install it with: pip install {package}"
        return f"no installed plugin is named {plugin!r}{did_you_mean(plugin, self.plugin_names)}"

    def _missing_modifier_message(self, name: str) -> str:
        if name in self.refused_offers:
            plugin = self.refused_offers[name]
            return (
                f"modifier {name!r} is offered by plugin {plugin!r}, which is installed but "
                f"failed to load ({self.failed[plugin]})"
            )
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
            adapters = tuple(sorted(a for a, (p, _) in self.experts_adapters.items() if p == name))
            infos.append(PluginInfo(name, package, version, modifiers, recipes, adapters))
        return infos


def load_registry(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> Registry:
    """The registry of everything installed plugins offer (built fresh on each call)."""
    return Registry.from_plugins(make_plugin_manager(entry_points))
