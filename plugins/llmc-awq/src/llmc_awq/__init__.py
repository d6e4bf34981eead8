"""AWQ (arXiv 2306.00978) and SmoothQuant (arXiv 2211.10438) for llmc, with mappings found from
the model's data flow.

Recipes name ``AWQModifier`` and ``SmoothQuantModifier`` (or ``awq.AWQModifier``);
``discover_mappings`` finds a layer's mappings, ``llmc_awq.scales`` holds the math on tensors.
"""

from llmc_awq.config import AWQModifier, SmoothQuantModifier
from llmc_awq.discovery import discover_mappings
from llmc_awq.folding import Producer, balance_, fold_into_producer_
from llmc_awq.mappings import Mapping, MappingSpec
from llmc_awq.run import AWQRun, SmoothQuantRun
from llmc_awq.scales import awq_scales, search_grid, smoothquant_scales, weight_means
from llmc_awq.search import SearchResult, search_scales

__all__ = [
    "AWQModifier",
    "AWQRun",
    "Mapping",
    "MappingSpec",
    "Producer",
    "SearchResult",
    "SmoothQuantModifier",
    "SmoothQuantRun",
    "awq_scales",
    "balance_",
    "discover_mappings",
    "fold_into_producer_",
    "search_grid",
    "search_scales",
    "smoothquant_scales",
    "weight_means",
]
