"""Integer, FP8, FP6 and FP4 (MX, NVFP4) quantization of Linear weights, input activations
(dynamic, or static from observers) and the KV cache in the compressed-tensors format: schemes,
the grids and the exact round-to-nearest math, observers, int32 and FP4 packing, the in-memory
representation of a quantized Linear that algorithms and the saver share, and the
straight-through forward of quantization-aware training."""

from llmc.quantization.fused import FUSED_SIBLINGS, shared_global_scales, take_global_scale
from llmc.quantization.grids import FP4_E2M1, FP6_E2M3, FP8_E4M3, Grid, grid_of
from llmc.quantization.math import (
    compute_qparams,
    dequantize,
    dynamic_activation_fake_quantize,
    effective_scale,
    fake_quantize,
    global_scale_from_range,
    loader_stable_weight,
    mx_exponents,
    qparam_shape,
    quantize,
    recover_codes,
    static_activation_fake_quantize,
)
from llmc.quantization.module import (
    has_static_inputs,
    input_global_scale_from_range,
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
    "FP4_E2M1",
    "FP6_E2M3",
    "FP8_E4M3",
    "FUSED_SIBLINGS",
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
    "effective_scale",
    "fake_quantize",
    "fake_quantized_weight",
    "global_scale_from_range",
    "grid_of",
    "has_static_inputs",
    "input_global_scale_from_range",
    "in_qat",
    "is_quantized",
    "kv_cache_args_from_config_dict",
    "loader_stable_weight",
    "make_observer",
    "mx_exponents",
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
    "shared_global_scales",
    "take_global_scale",
    "start_qat_",
    "static_activation_fake_quantize",
    "stop_qat_",
    "unpack_from_int32",
    "weight_codes",
]
