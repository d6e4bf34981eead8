"""The checkpoint writer's seams: the format registry and the plugins' config entries."""

from __future__ import annotations

import pluggy
import pytest
import torch

from llmc import hookimpl, hookspecs
from llmc.errors import SaveError
from llmc.quantization import PRESET_SCHEMES, QuantizationArgs, QuantizationScheme, preset_scheme
from llmc.save import (
    FormatWriter,
    plugin_config_entries,
    register_format,
    registered_formats,
    with_config_entries,
)
from llmc.save.formats import format_writer, group_format


@pytest.mark.parametrize(
    ("preset", "save_compressed", "expected"),
    [
        ("W4A16", True, "pack-quantized"),
        ("W8A16", True, "pack-quantized"),
        ("W8A8", True, "int-quantized"),
        ("FP8_DYNAMIC", True, "float-quantized"),
        ("W4A16", False, "dense"),
        ("FP8_DYNAMIC", False, "dense"),
    ],
)
def test_format_inferred_from_the_scheme_as_compressed_tensors_does(preset, save_compressed, expected):
    assert group_format(preset_scheme(preset, ["Linear"]), save_compressed=save_compressed) == expected


FP8_WEIGHT_ONLY = QuantizationScheme(weights=QuantizationArgs(num_bits=8, type="float", strategy="channel"))
INFERENCE_CASES = {
    **{name: scheme for name, scheme in PRESET_SCHEMES.items()},
    "fp8-weight-only": FP8_WEIGHT_ONLY,
    "int3-group32": QuantizationScheme(weights=QuantizationArgs(num_bits=3, strategy="group", group_size=32)),
}


@pytest.mark.parametrize("scheme", INFERENCE_CASES.values(), ids=INFERENCE_CASES.keys())
def test_format_inference_equals_compressed_tensors_infer_module_format(scheme):
    """The oracle: compressed-tensors' own priority list (FP8 weight-only falls to naive-quantized)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme as CTScheme

    expected = infer_module_format(torch.nn.Linear, CTScheme.model_validate(scheme.to_config_dict()))
    assert group_format(scheme, save_compressed=True) == expected.value


def test_every_format_the_scheme_accepts_has_a_writer():
    from llmc.quantization.scheme import FORMATS

    assert set(FORMATS) <= set(registered_formats())


def test_format_registry_refuses_a_second_writer_and_names_unknown_formats():
    with pytest.raises(SaveError, match=r"a writer for format 'pack-quantized' is already registered"):
        register_format(FormatWriter("pack-quantized", lambda module, compressed: {}))
    with pytest.raises(SaveError, match=r"no writer for the compressed-tensors format 'pack-quantised'; did you mean 'pack-quantized'\?"):
        format_writer("pack-quantised")


def _manager(*plugins: object) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for index, plugin in enumerate(plugins):
        manager.register(plugin, name=f"p{index}")
    return manager


class _Entries:
    def __init__(self, entries):
        self.entries = entries

    @hookimpl
    def llmc_checkpoint_config(self, model):
        return self.entries


def test_plugin_config_entries_are_merged_into_the_quantization_config():
    entries = plugin_config_entries(_manager(_Entries({"sparsity_config": {"format": "dense"}}), _Entries(None)), model=None)
    assert entries == {"sparsity_config": {"format": "dense"}}
    merged = with_config_entries({"format": "pack-quantized", "sparsity_config": {}}, entries)
    assert merged == {"format": "pack-quantized", "sparsity_config": {"format": "dense"}}
    assert with_config_entries(None, entries) is None  # nothing quantized: a plain dense checkpoint


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ([{"sparsity_config": {}}, {"sparsity_config": {}}], r"plugins 'p\d' and 'p\d' both set quantization_config\['sparsity_config'\]"),
        ([{"format": "dense"}], r"plugin 'p0' may not set quantization_config\['format'\], which core writes"),
        (["not a dict"], r"plugin 'p0': llmc_checkpoint_config must return a dict or None \(got str\)"),
    ],
    ids=["two-owners", "core-key", "not-a-dict"],
)
def test_plugin_config_entries_conflicts_are_refused(plugins, message):
    with pytest.raises(SaveError, match=message):
        plugin_config_entries(_manager(*[_Entries(p) for p in plugins]), model=None)
