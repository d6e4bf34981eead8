"""Named datasets that need no download: ``dataset='llmc:stdlib-docs'``.

Machines that run llmc often cannot reach the Hugging Face hub, yet the demo, the tests and a first
try of a recipe all need some text. The package therefore ships a small corpus (docstrings of the
Python standard library, text every machine already has under a permissive license) and exposes it
by name. Plugins can add their own names with ``register_dataset_preset``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

import datasets

from llmc.errors import DataError, PluginError, did_you_mean

__all__ = [
    "PRESET_PREFIX",
    "asset_path",
    "dataset_presets",
    "get_dataset_preset",
    "is_preset_name",
    "register_dataset_preset",
]

PRESET_PREFIX = "llmc:"

DatasetLoader = Callable[[], datasets.Dataset]

_PRESETS: dict[str, DatasetLoader] = {}


def asset_path(*parts: str) -> Path:
    """Where a file shipped inside the package lives on disk.

    Resolved through ``importlib.resources`` rather than ``__file__`` so that it keeps working
    for any install layout that keeps package data as files (wheels, editable installs).
    """
    location = importlib.resources.files("llmc") / "assets"
    for part in parts:
        location = location / part
    return Path(str(location))


def register_dataset_preset(name: str, loader: DatasetLoader, *, replace: bool = False) -> None:
    """Make ``dataset=name`` load ``loader()``.

    The loader is called only when the preset is used, so registering costs nothing. A second
    registration of the same name is refused unless ``replace=True``: two plugins silently
    shadowing each other's data would make calibration results depend on import order.
    """
    if not isinstance(name, str) or not name.strip():
        raise PluginError(f"a dataset preset name must be a non-empty string (got {name!r})")
    if not callable(loader):
        raise PluginError(
            f"the loader of dataset preset {name!r} must be callable (got {type(loader).__name__})"
        )
    if name in _PRESETS and not replace:
        raise PluginError(
            f"dataset preset {name!r} is already registered; pass replace=True to override it"
        )
    _PRESETS[name] = loader


def dataset_presets() -> dict[str, DatasetLoader]:
    """A copy of the registry, so callers can list names without being able to change it."""
    return dict(_PRESETS)


def is_preset_name(name: str) -> bool:
    """Whether ``name`` refers to a preset (registered, or in the reserved ``llmc:`` namespace)."""
    return name in _PRESETS or name.startswith(PRESET_PREFIX)


def get_dataset_preset(name: str) -> datasets.Dataset:
    """Load a preset by name; an unknown name gets the closest registered one."""
    try:
        loader = _PRESETS[name]
    except KeyError:
        raise DataError(f"unknown dataset preset {name!r}{did_you_mean(name, _PRESETS)}") from None
    dataset = loader()
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"dataset preset {name!r} returned {type(dataset).__name__}, expected datasets.Dataset"
        )
    return dataset


def _stdlib_docs_loader(split: str) -> DatasetLoader:
    def load() -> datasets.Dataset:
        path = asset_path("stdlib_docs", f"{split}.jsonl.gz")
        if not path.is_file():
            raise DataError(f"the embedded corpus file {path} is missing; reinstall llmc-core")
        return datasets.load_dataset("json", data_files=str(path), split="train")

    load.__doc__ = f"The {split} split of the embedded standard-library docstring corpus."
    return load


register_dataset_preset("llmc:stdlib-docs", _stdlib_docs_loader("train"))
register_dataset_preset("llmc:stdlib-docs-heldout", _stdlib_docs_loader("heldout"))
