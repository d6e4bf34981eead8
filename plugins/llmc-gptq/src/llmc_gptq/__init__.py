"""GPTQ weight quantization for llmc (arXiv 2210.17323), with a numba CPU sweep.

Recipes name ``GPTQModifier`` (or ``gptq.GPTQModifier``); ``gptq_quantize`` is the math on
one weight matrix, usable on its own.
"""

from llmc_gptq.config import GPTQModifier
from llmc_gptq.gptq import GPTQResult, gptq_quantize
from llmc_gptq.run import GPTQRun

__all__ = ["GPTQModifier", "GPTQResult", "GPTQRun", "gptq_quantize"]
