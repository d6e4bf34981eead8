"""Recipes: which modifiers run, in which stages, with which parameters.

A recipe comes as a YAML file, a YAML string, a shipped name (``llmc:w4a16``), a modifier object
or a list of them. The YAML layout is llm-compressor's, so its recipes load unchanged::

    quant_stage:                 # a stage: a key ending in _stage
      quant_modifiers:           # a group: a key ending in _modifiers
        GPTQModifier:            # a modifier by recipe name, or plugin.Name
          scheme: W4A16
          ignore: [lm_head]

A group may also stand at the top level (one implicit stage), and a top-level ``plugins:`` list
names plugins the recipe needs. YAML is read with ruamel.yaml's round-trip loader, which builds
only plain mappings, lists and scalars (never Python objects), and keeps line numbers so every
problem can be reported with its place. All problems are collected and reported at once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from llmc.converters import make_converter, validation_problems
from llmc.errors import LlmcError, PluginError, RecipeError, closest, did_you_mean
from llmc.modifier import Modifier
from llmc.plugins import Registry

__all__ = [
    "Recipe",
    "RecipeModifier",
    "RecipeStage",
    "load_recipe",
    "recipe_to_yaml",
]

RECIPE_PREFIX = "llmc:"
SPARSEZOO_PREFIX = "zoo:"
DEFAULT_STAGE = "default_stage"
DEFAULT_GROUP = "default_modifiers"
TOP_LEVEL_KEYS = ("plugins", "version")
STAGE_KEYS = ("run_type",)


@attrs.frozen
class RecipeModifier:
    """One modifier of a recipe, with where it came from."""

    group: str
    plugin: str
    modifier: Modifier

    @property
    def name(self) -> str:
        return type(self.modifier).recipe_name()


@attrs.frozen
class RecipeStage:
    name: str
    modifiers: tuple[RecipeModifier, ...]
    run_type: str | None = None


@attrs.frozen
class Recipe:
    """A validated recipe: stages in order, each with its modifiers in order."""

    stages: tuple[RecipeStage, ...]
    plugins: tuple[str, ...] = ()
    source: str = "<python>"

    @property
    def modifiers(self) -> list[RecipeModifier]:
        return [entry for stage in self.stages for entry in stage.modifiers]

    @property
    def requires_calibration_data(self) -> bool:
        return any(e.modifier.requires_calibration_data for e in self.modifiers)

    def only_stage(self, name: str) -> Recipe:
        """This recipe with one stage kept, for ``stage=...``."""
        kept = tuple(stage for stage in self.stages if stage.name == name)
        if not kept:
            names = [stage.name for stage in self.stages]
            raise RecipeError(f"recipe has no stage {name!r}{did_you_mean(name, names)}")
        return attrs.evolve(self, stages=kept)


# --- converting recipe values into modifier classes ---------------------------------------


CONVERTER = make_converter()


def _plain(node: Any) -> Any:
    """ruamel's round-trip containers as plain dicts and lists (so attrs equality holds)."""
    if isinstance(node, Mapping):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(item) for item in node]
    return node


def _line(node: Any, key: Any = None) -> int | None:
    """1-based line of a mapping key (or of the node itself) in the YAML source."""
    try:
        if key is not None and isinstance(node, CommentedMap):
            return node.lc.key(key)[0] + 1
        if isinstance(node, (CommentedMap, CommentedSeq)):
            return node.lc.line + 1
    except (AttributeError, KeyError, TypeError):
        return None
    return None


class _Problems:
    """Collects every problem of a recipe so they can be reported together."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{self.source}:{line}" if line is not None else self.source
        self.items.append(f"{path}: {message} ({where})" if path else f"{message} ({where})")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise RecipeError(f"invalid recipe: {self.items[0]}", problems=self.items)
        numbered = "; ".join(f"({i}) {item}" for i, item in enumerate(self.items, 1))
        raise RecipeError(
            f"invalid recipe, {len(self.items)} problems: {numbered}", problems=self.items
        )


# --- reading the source --------------------------------------------------------------------


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _read_source(recipe: str | os.PathLike[str], registry: Registry) -> tuple[Any, str]:
    """Parse a recipe file, shipped name or YAML string into a YAML tree and its source name."""
    text: str
    source: str
    value = os.fspath(recipe)
    if value.startswith(SPARSEZOO_PREFIX):
        raise RecipeError(_sparsezoo_message(value, sorted(registry.recipes)))
    if value.startswith(RECIPE_PREFIX):
        name = value[len(RECIPE_PREFIX):]
        if name not in registry.recipes:
            raise RecipeError(
                f"no shipped recipe named {value!r}"
                f"{did_you_mean(name, registry.recipes) or '; see: llmc recipes'}"
            )
        path = registry.recipes[name][1]
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif "\n" not in value and (value.endswith((".yaml", ".yml")) or Path(value).is_file()):
        path = Path(value).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {value!r} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        text, source = value, "<recipe string>"
    try:
        tree = _yaml().load(io.StringIO(text))
    except MarkedYAMLError as error:
        mark = error.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = (error.problem or str(error)).strip()
        raise RecipeError(f"malformed YAML in {source}{line}: {problem}") from None
    except YAMLError as error:
        raise RecipeError(f"malformed YAML in {source}: {error}") from None
    if not isinstance(tree, Mapping):
        if isinstance(tree, str) and source == "<recipe string>":
            raise RecipeError(
                f"recipe {value!r} is neither an existing file, a shipped recipe name "
                "(llmc:<name>, see: llmc recipes) nor a YAML mapping"
            )
        raise RecipeError(f"a recipe must be a YAML mapping of stages (got {type(tree).__name__}) in {source}")
    return tree, source


def _sparsezoo_message(stub: str, shipped: list[str]) -> str:
    """Refuse a SparseZoo stub (llm-compressor's ``zoo:...``), naming the nearest shipped recipe.

    The stub's last path part (``llama2-7b-...-pruned50_quantized``) is compared with the shipped
    names: one it contains wins (the longest), else the closest by spelling.
    """
    tail = stub[len(SPARSEZOO_PREFIX):].rstrip("/").rpartition("/")[2].lower()
    contained = [name for name in shipped if name.lower() in tail]
    match = max(contained, key=len) if contained else closest(tail, shipped)
    if match is not None:
        hint = f"the closest shipped recipe is '{RECIPE_PREFIX}{match}'"
    elif shipped:
        hint = "shipped recipes: " + ", ".join(RECIPE_PREFIX + name for name in shipped)
    else:
        hint = "no recipe is shipped"
    return (
        f"SparseZoo recipe stubs are not supported (got {stub!r}); {hint} (see: llmc recipes), "
        "or pass a recipe YAML file"
    )


# --- recipe_args ----------------------------------------------------------------------------


def _apply_overrides(
    tree: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]],
    overrides: Mapping[str, Any],
    resolved: dict[tuple[str, str, int], tuple[str, type[Modifier]]],
) -> None:
    """Apply ``recipe_args`` to the modifier parameters, refusing keys that set nothing.

    A key is a bare parameter name (applies to every modifier having it), ``Modifier.param``,
    or ``stage.group.Modifier.param``; ``Modifier`` may be qualified by the plugin that provides
    it (``core.QuantizationModifier.scheme``), whether or not the recipe wrote it so.
    """
    field_names = {
        position: {f.name for f in attrs.fields(cls)} for position, (_, cls) in resolved.items()
    }
    for key, value in overrides.items():
        parts = key.split(".")
        field = parts[-1]
        selector = parts[:-1]
        hits = 0
        known_fields: set[str] = set()
        for stage_name, groups in tree.items():
            for group_name, entries in groups.items():
                for index, (modifier_name, params) in enumerate(entries):
                    position = (stage_name, group_name, index)
                    bare_name = modifier_name.rpartition(".")[2]
                    plugin = resolved[position][0] if position in resolved else None
                    if selector and selector not in (
                        [bare_name], [plugin, bare_name], [stage_name, group_name, bare_name],
                        [stage_name, group_name, plugin, bare_name],
                    ):
                        continue
                    fields = field_names.get(position, set())
                    known_fields |= fields
                    if field in fields:
                        params[field] = value
                        hits += 1
        if hits == 0:
            if selector and not known_fields:
                raise RecipeError(f"recipe_args key {key!r} names no modifier of the recipe")
            raise RecipeError(
                f"recipe_args key {key!r} sets nothing: no modifier it names has a parameter "
                f"{field!r}{did_you_mean(field, known_fields)}"
            )


# --- building the recipe --------------------------------------------------------------------


def _normalize(tree: Mapping[str, Any], problems: _Problems) -> tuple[
    dict[str, dict[str, list[tuple[str, Any]]]], dict[str, str | None], list[str]
]:
    """Stages → groups → [(modifier name, params node)], from either recipe layout."""
    stages: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    run_types: dict[str, str | None] = {}
    plugins: list[str] = []

    def read_group(stage: str, group: str, node: Any) -> None:
        entries: list[tuple[str, Any]] = []
        if isinstance(node, Mapping):
            items: Iterable[tuple[Any, Any]] = node.items()
        elif isinstance(node, list) and all(isinstance(i, Mapping) and len(i) == 1 for i in node):
            items = [next(iter(i.items())) for i in node]
        else:
            problems.add(f"{stage}.{group}", "must be a mapping of modifier names to parameters", _line(node))
            return
        for name, params in items:
            if params is None:
                params = CommentedMap()
            if not isinstance(params, Mapping):
                problems.add(f"{stage}.{group}.{name}", f"parameters must be a mapping (got {params!r})", _line(node, name))
                continue
            entries.append((str(name), params))
        stages.setdefault(stage, {})[group] = entries

    for key, node in tree.items():
        key = str(key)
        if key == "plugins":
            if isinstance(node, str):
                node = [node]
            if not isinstance(node, list) or not all(isinstance(p, str) for p in node):
                problems.add("plugins", "must be a list of plugin names", _line(tree, key))
            else:
                plugins.extend(node)
        elif key in TOP_LEVEL_KEYS:
            continue
        elif key.endswith("_modifiers"):
            read_group(DEFAULT_STAGE, key, node)
            run_types.setdefault(DEFAULT_STAGE, None)
        elif key.endswith("_stage"):
            if not isinstance(node, Mapping):
                problems.add(key, "a stage must be a mapping of '*_modifiers' groups", _line(tree, key))
                continue
            stages.setdefault(key, {})
            run_types[key] = None
            for group, group_node in node.items():
                group = str(group)
                if group == "run_type":
                    run_types[key] = str(group_node)
                elif group.endswith("_modifiers"):
                    read_group(key, group, group_node)
                else:
                    problems.add(
                        f"{key}.{group}",
                        "unknown stage key: groups of modifiers must end in '_modifiers'"
                        f"{did_you_mean(group, ['run_type'])}",
                        _line(node, group),
                    )
        else:
            problems.add(
                key,
                "unknown top-level key: stages end in '_stage', modifier groups in '_modifiers'"
                f"{did_you_mean(key, TOP_LEVEL_KEYS)}",
                _line(tree, key),
            )
    return stages, run_types, plugins


def _structure_modifier(
    modifier_class: type[Modifier], params: Mapping[str, Any], path: str, node: Any,
    problems: _Problems,
) -> Modifier | None:
    values = _plain(params)
    fields = {f.name for f in attrs.fields(modifier_class)}
    unknown = [key for key in values if key not in fields]
    for key in unknown:
        problems.add(f"{path}.{key}", f"unknown parameter{did_you_mean(key, fields)}", _line(node, key))
    if unknown:
        return None
    try:
        return CONVERTER.structure(values, modifier_class)
    except cattrs.BaseValidationError as error:
        for field, text in validation_problems(error, values):
            text = text.removeprefix("invalid recipe: ")
            problems.add(f"{path}.{field}" if field else path, text, _line(node, field) if field else _line(node))
    except (LlmcError, TypeError, ValueError) as error:
        problems.add(path, str(error).removeprefix("invalid recipe: "), _line(node))
    return None


def load_recipe(
    recipe: Any,
    registry: Registry,
    *,
    recipe_args: Mapping[str, Any] | None = None,
    stage: str | None = None,
) -> Recipe:
    """Parse and validate a recipe in any accepted form, with ``recipe_args`` applied."""
    if recipe is None:
        raise RecipeError("no recipe given; pass recipe=<file, YAML string or llmc:name> (see: llmc recipes)")
    if isinstance(recipe, (list, tuple)) and not recipe:
        raise RecipeError(
            "the recipe list is empty; give at least one modifier, e.g. "
            "[QuantizationModifier(scheme='W4A16')], or a shipped name such as 'llmc:w4a16'"
        )
    if isinstance(recipe, Modifier) or (
        isinstance(recipe, (list, tuple)) and recipe and all(isinstance(m, Modifier) for m in recipe)
    ):
        loaded = _recipe_from_objects([recipe] if isinstance(recipe, Modifier) else list(recipe), registry)
        if recipe_args:
            # Overrides go through YAML so objects and files are validated the same way; with the
            # registry, a name two plugins offer is written qualified (core.QuantizationModifier).
            text = recipe_to_yaml(loaded, registry)
            return load_recipe(text, registry, recipe_args=recipe_args, stage=stage)
    elif isinstance(recipe, (str, os.PathLike)):
        tree, source = _read_source(recipe, registry)
        loaded = _recipe_from_tree(tree, source, registry, recipe_args or {})
    elif isinstance(recipe, Mapping):
        loaded = _recipe_from_tree(recipe, "<recipe mapping>", registry, recipe_args or {})
    else:
        raise RecipeError(
            "recipe must be a YAML file, a YAML string, a shipped name (llmc:<name>), a modifier "
            f"or a list of modifiers (got {type(recipe).__name__})"
        )
    return loaded.only_stage(stage) if stage is not None else loaded


def _recipe_from_objects(modifiers: list[Modifier], registry: Registry) -> Recipe:
    entries = []
    for modifier in modifiers:
        plugin = _plugin_of(type(modifier), registry)
        entries.append(RecipeModifier(group=DEFAULT_GROUP, plugin=plugin, modifier=modifier))
    return Recipe(stages=(RecipeStage(DEFAULT_STAGE, tuple(entries)),))


def _plugin_of(modifier_class: type[Modifier], registry: Registry) -> str:
    owners = registry.modifiers.get(modifier_class.recipe_name(), {})
    for plugin, registered in owners.items():
        if registered is modifier_class:
            return plugin
    raise PluginError(
        f"modifier class {modifier_class.__qualname__} is not registered by any installed plugin; "
        "return it from a plugin's llmc_register_modifiers hook"
    )


def _recipe_from_tree(
    tree: Mapping[str, Any], source: str, registry: Registry, recipe_args: Mapping[str, Any]
) -> Recipe:
    problems = _Problems(source)
    stages, run_types, plugins = _normalize(tree, problems)
    for plugin in plugins:
        try:
            registry.require_plugin(plugin)
        except PluginError as error:
            problems.add("plugins", str(error), _line(tree, "plugins"))

    resolved: dict[tuple[str, str, int], tuple[str, type[Modifier]]] = {}
    for stage_name, groups in stages.items():
        for group_name, entries in groups.items():
            for index, (name, params) in enumerate(entries):
                try:
                    resolved[(stage_name, group_name, index)] = registry.resolve(name)
                except PluginError as error:
                    problems.add(f"{stage_name}.{group_name}.{name}", str(error), _line(params))
    if not stages and not problems.items:
        problems.add("", "recipe has no stages or modifiers")

    # Overrides only make sense once every name resolved; otherwise report what is known.
    if recipe_args and not problems.items:
        _apply_overrides(stages, recipe_args, resolved)

    built_stages = []
    for stage_name, groups in stages.items():
        built: list[RecipeModifier] = []
        for group_name, entries in groups.items():
            for index, (name, params) in enumerate(entries):
                if (stage_name, group_name, index) not in resolved:
                    continue
                plugin, modifier_class = resolved[(stage_name, group_name, index)]
                path = f"{stage_name}.{group_name}.{name}"
                modifier = _structure_modifier(modifier_class, params, path, params, problems)
                if modifier is not None:
                    built.append(RecipeModifier(group=group_name, plugin=plugin, modifier=modifier))
        built_stages.append(RecipeStage(stage_name, tuple(built), run_types.get(stage_name)))
    problems.raise_if_any()
    return Recipe(stages=tuple(built_stages), plugins=tuple(plugins), source=source)


# --- writing ---------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe, registry: Registry | None = None) -> dict[str, Any]:
    """The recipe with every parameter resolved, in the llm-compressor layout."""
    data: dict[str, Any] = {}
    if recipe.plugins:
        data["plugins"] = list(recipe.plugins)
    for stage in recipe.stages:
        stage_data: dict[str, Any] = {}
        if stage.run_type is not None:
            stage_data["run_type"] = stage.run_type
        for entry in stage.modifiers:
            name = entry.name
            if registry is not None and len(registry.modifiers.get(name, {})) > 1:
                name = f"{entry.plugin}.{name}"
            group = stage_data.setdefault(entry.group, {})
            group[name] = CONVERTER.unstructure(entry.modifier)
        data[stage.name] = stage_data
    return data


def recipe_to_yaml(recipe: Recipe, registry: Registry | None = None) -> str:
    """YAML text that loads back into an equal recipe."""
    stream = io.StringIO()
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    yaml.dump(recipe_to_dict(recipe, registry), stream)
    return stream.getvalue()
