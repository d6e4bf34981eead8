"""Modifiers that ship with core (registered through the same hook as plugins)."""

from llmc.modifiers.quantization import QuantizationModifier

__all__ = ["QuantizationModifier"]
