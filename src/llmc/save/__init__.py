"""Saving compressed models in the compressed-tensors format (transformers and vLLM load it)."""

from llmc.save.checkpoint import check_output_dir, save_checkpoint
from llmc.save.compressed_tensors import (
    compressed_state_dict,
    group_format,
    quantization_config,
)

__all__ = [
    "check_output_dir",
    "compressed_state_dict",
    "group_format",
    "quantization_config",
    "save_checkpoint",
]
