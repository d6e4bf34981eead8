"""Saving compressed models in the compressed-tensors format (transformers and vLLM load it)."""

from llmc.save.checkpoint import check_output_dir, output_path, save_checkpoint
from llmc.save.compressed_tensors import (
    compressed_state_dict,
    group_format,
    plugin_config_entries,
    quantization_config,
    with_config_entries,
)
from llmc.save.formats import FormatWriter, register_format, registered_formats

__all__ = [
    "FormatWriter",
    "check_output_dir",
    "output_path",
    "compressed_state_dict",
    "group_format",
    "plugin_config_entries",
    "quantization_config",
    "register_format",
    "registered_formats",
    "save_checkpoint",
    "with_config_entries",
]
