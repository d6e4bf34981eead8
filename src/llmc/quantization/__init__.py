"""Integer and FP8 quantization of Linear weights, input activations (dynamic, or static from
observers) and the KV cache in the compressed-tensors format: schemes, the grids and the exact
round-to-nearest math, observers, int32 packing, the in-memory representation of a quantized
Linear that algorithms and the saver share, and the straight-through forward of
quantization-aware training."""

from llmc.quantization.grids import FP8_E4M3, Grid, grid_of
from llmc.quantization.math import (
    compute_qparams,
    dequantize,
    dynamic_activation_fake_quantize,
    fake_quantize,
    loader_stable_weight,
    qparam_shape,
    quantize,
    recover_codes,
    static_activation_fake_quantize,
)
from llmc.quantization.module import (
    has_static_inputs,
    is_quantized,
    quantize_linear_,
    quantized_linears,
    set_input_qparams_,
    set_quantized_weight_,
    weight_codes,
)
from llmc.quantization.observers import Observer, make_observer, observe_weight
from llmc.quantization.packing import pack_to_int32, packed_size, unpack_from_int32
from llmc.quantization.qat import fake_quantized_weight, in_qat, start_qat_, stop_qat_
from llmc.quantization.scheme import (
    PRESET_ALIASES,
    PRESET_SCHEMES,
    UNSUPPORTED_PRESETS,
    QuantizationArgs,
    QuantizationScheme,
    args_from_config_dict,
    kv_cache_args_from_config_dict,
    preset_scheme,
    scheme_from_config_dict,
    schemes_from_config_groups,
)

__all__ = [
    "FP8_E4M3",
    "PRESET_ALIASES",
    "PRESET_SCHEMES",
    "UNSUPPORTED_PRESETS",
    "Grid",
    "Observer",
    "QuantizationArgs",
    "QuantizationScheme",
    "args_from_config_dict",
    "compute_qparams",
    "dequantize",
    "dynamic_activation_fake_quantize",
    "fake_quantize",
    "fake_quantized_weight",
    "grid_of",
    "has_static_inputs",
    "in_qat",
    "is_quantized",
    "kv_cache_args_from_config_dict",
    "loader_stable_weight",
    "make_observer",
    "observe_weight",
    "pack_to_int32",
    "packed_size",
    "preset_scheme",
    "qparam_shape",
    "quantize",
    "quantize_linear_",
    "quantized_linears",
    "recover_codes",
    "scheme_from_config_dict",
    "schemes_from_config_groups",
    "set_input_qparams_",
    "set_quantized_weight_",
    "start_qat_",
    "static_activation_fake_quantize",
    "stop_qat_",
    "unpack_from_int32",
    "weight_codes",
]
