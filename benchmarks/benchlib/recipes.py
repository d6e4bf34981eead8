"""The recipe names the benchmarks know, and our recipe text for each.

``PEER_RECIPES`` are the names ``peer_oneshot.py`` maps to llm-compressor modifiers with the same
parameters: a comparison runs the same name on both tools. Ours has more: round-to-nearest
(data-free), magnitude pruning, true-sequential SparseGPT and pruning + quantization.

Every modifier targets the Linear layers and leaves ``lm_head`` alone. GPTQ options given to
``recipe_text`` (``actorder``, ``true_sequential``) go into every GPTQModifier of the recipe;
without them llmc-gptq's defaults hold (act-order static, no true-sequential), which are also
llm-compressor's.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AWQ_RECIPES",
    "SCHEME_RECIPES",
    "OURS_RECIPES",
    "PEER_RECIPES",
    "SMOOTHQUANT_STRENGTH",
    "SPARSITY_RECIPES",
    "modifiers_of",
    "recipe_text",
]

_LINEARS = "targets: [Linear], ignore: [lm_head]"
_GPTQ_OPTIONS = "<gptq-options>"
_GPTQ = f"GPTQModifier: {{scheme: W4A16, {_LINEARS}{_GPTQ_OPTIONS}}}"
# int4 symmetric in groups of 64, for models whose widths 128 does not divide (SmolLM2: 576)
_W4_G64 = (
    "{group_0: {targets: [Linear], weights: {num_bits: 4, type: int, symmetric: true, "
    "strategy: group, group_size: 64}}}"
)
_GPTQ_G64 = f"GPTQModifier: {{config_groups: {_W4_G64}, {_LINEARS}{_GPTQ_OPTIONS}}}"
_GPTQ_W8A8 = f"GPTQModifier: {{scheme: W8A8, {_LINEARS}{_GPTQ_OPTIONS}}}"


# llm-compressor's W8A8 examples smooth with this strength; both tools use it here
SMOOTHQUANT_STRENGTH = 0.8
_AWQ = "AWQModifier: {duo_scaling: true}"
_SMOOTHQUANT = f"SmoothQuantModifier: {{smoothing_strength: {SMOOTHQUANT_STRENGTH}}}"


def _quantizer(name: str, scheme: str) -> str:
    return f"{name}: {{scheme: {scheme}, {_LINEARS}}}"


def _stage(kind: str, *modifiers: str) -> str:
    return f"{kind}_stage:\n  {kind}_modifiers:\n" + "".join(f"    {m}\n" for m in modifiers)


def _sparsegpt(params: str) -> str:
    return f"SparseGPTModifier: {{{params}, {_LINEARS}}}"


# name: (recipe for llmc.oneshot, modifiers an installed plugin must provide; none for core's)
OURS_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rtn-w4a16": ("llmc:w4a16", ()),
    "gptq-w4a16": (_stage("quant", _GPTQ), ("GPTQModifier",)),
    "gptq-w4a16-g64": (_stage("quant", _GPTQ_G64), ("GPTQModifier",)),
    "gptq-w8a8": (_stage("quant", _GPTQ_W8A8), ("GPTQModifier",)),
    "sparsegpt-50": (
        _stage("sparsity", _sparsegpt("sparsity: 0.5, mask_structure: '0:0'")),
        ("SparseGPTModifier",),
    ),
    "sparsegpt-2:4": (
        _stage("sparsity", _sparsegpt("sparsity: 0.5, mask_structure: '2:4'")),
        ("SparseGPTModifier",),
    ),
    "sparsegpt-50-seq": (
        _stage(
            "sparsity", _sparsegpt("sparsity: 0.5, mask_structure: '0:0', true_sequential: true")
        ),
        ("SparseGPTModifier",),
    ),
    "sparsegpt-2:4-seq": (
        _stage(
            "sparsity", _sparsegpt("sparsity: 0.5, mask_structure: '2:4', true_sequential: true")
        ),
        ("SparseGPTModifier",),
    ),
    "wanda-50": (
        _stage(
            "sparsity",
            f"WandaPruningModifier: {{sparsity: 0.5, mask_structure: '0:0', {_LINEARS}}}",
        ),
        ("WandaPruningModifier",),
    ),
    "wanda-2:4": (
        _stage("sparsity", f"WandaPruningModifier: {{mask_structure: '2:4', {_LINEARS}}}"),
        ("WandaPruningModifier",),
    ),
    "magnitude-50": (
        _stage("sparsity", f"MagnitudePruningModifier: {{final_sparsity: 0.5, {_LINEARS}}}"),
        ("MagnitudePruningModifier",),
    ),
    "magnitude-2:4": (
        _stage("sparsity", f"MagnitudePruningModifier: {{mask_structure: '2:4', {_LINEARS}}}"),
        ("MagnitudePruningModifier",),
    ),
    "sparsegpt-2:4+rtn-w4a16": ("llmc:sparsegpt_2of4_w4a16", ("SparseGPTModifier",)),
    "rtn-w4a16-asym": ("llmc:w4a16_asym", ()),
    "awq-w4a16-asym": (
        _stage("quant", _AWQ, _quantizer("QuantizationModifier", "W4A16_ASYM")), ("AWQModifier",)
    ),
    "gptq-w4a16-asym": (_stage("quant", _quantizer("GPTQModifier", "W4A16_ASYM")), ("GPTQModifier",)),
    "awq+gptq-w4a16-asym": (
        _stage("quant", _AWQ, _quantizer("GPTQModifier", "W4A16_ASYM")),
        ("AWQModifier", "GPTQModifier"),
    ),
    "awq-w4a16": (_stage("quant", _AWQ, _quantizer("QuantizationModifier", "W4A16")), ("AWQModifier",)),
    "awq+gptq-w4a16": (
        _stage("quant", _AWQ, _quantizer("GPTQModifier", "W4A16")), ("AWQModifier", "GPTQModifier")
    ),
    "rtn-w8a8": ("llmc:w8a8", ()),
    "smoothquant+rtn-w8a8": (
        _stage("quant", _SMOOTHQUANT, _quantizer("QuantizationModifier", "W8A8")),
        ("SmoothQuantModifier",),
    ),
    "sparsegpt-2:4+gptq-w4a16": (
        _stage("sparsity", _sparsegpt("mask_structure: '2:4'"), _GPTQ),
        ("SparseGPTModifier", "GPTQModifier"),
    ),
    "sparsegpt-2:4+gptq-w4a16-g64": (
        _stage("sparsity", _sparsegpt("mask_structure: '2:4'"), _GPTQ_G64),
        ("SparseGPTModifier", "GPTQModifier"),
    ),
    # two stages, so two passes over the model: GPTQ calibrates on the pruned model, what
    # llm-compressor 0.14 does with the one-stage recipe above (it runs a pipeline per modifier)
    "sparsegpt-2:4-then-gptq-w4a16-g64": (
        _stage("sparsity", _sparsegpt("mask_structure: '2:4'")) + _stage("quant", _GPTQ_G64),
        ("SparseGPTModifier", "GPTQModifier"),
    ),
}

# Every preset family of issue 9, by round-to-nearest and GPTQ: name -> (method, preset). The
# same names for both tools; the peer runs QuantizationModifier / GPTQModifier with the preset.
BENCHMARK_SCHEMES = (
    "W2A16", "W3A16", "W4A16", "W8A16", "W8A8", "W4AFP8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK",
    "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP8",
)
SCHEME_RECIPES: dict[str, tuple[str, str]] = {
    f"{method}-{scheme.lower().replace('_', '-')}": (method, scheme)
    for scheme in BENCHMARK_SCHEMES
    for method in ("rtn", "gptq")
}
for _name, (_method, _scheme) in SCHEME_RECIPES.items():
    if _name not in OURS_RECIPES:
        _modifier = "QuantizationModifier" if _method == "rtn" else "GPTQModifier"
        OURS_RECIPES[_name] = (
            _stage("quant", _quantizer(_modifier, _scheme)),
            () if _method == "rtn" else ("GPTQModifier",),
        )

# AWQ and SmoothQuant (llmc-awq) in llm-compressor 0.14's layout: the smoothing modifier first,
# the quantizer after it in the same stage supplying the scheme; the same names for both tools
AWQ_RECIPES = (
    "rtn-w4a16-asym", "awq-w4a16-asym", "gptq-w4a16-asym", "awq+gptq-w4a16-asym",
    "rtn-w4a16", "awq-w4a16", "gptq-w4a16", "awq+gptq-w4a16",
    "rtn-w8a8", "smoothquant+rtn-w8a8",
)

PEER_RECIPES = (
    "gptq-w4a16",
    "gptq-w4a16-g64",
    "gptq-w8a8",
    "sparsegpt-50",
    "sparsegpt-2:4",
    "wanda-50",
    "wanda-2:4",
    "sparsegpt-2:4+gptq-w4a16",
    "sparsegpt-2:4+gptq-w4a16-g64",
    "sparsegpt-2:4-then-gptq-w4a16-g64",
    *(name for name in AWQ_RECIPES if name != "gptq-w4a16"),
    *(name for name in SCHEME_RECIPES if name not in AWQ_RECIPES and name not in ("gptq-w4a16", "gptq-w8a8")),
)

# the pruning baselines and combinations of docs/benchmarks.md's sparsity quality table
SPARSITY_RECIPES = tuple(
    name for name in OURS_RECIPES
    if not name.startswith(("rtn-", "gptq-")) and name not in AWQ_RECIPES
    and name not in SCHEME_RECIPES
)


def recipe_text(name: str, **gptq_options: Any) -> str:
    """Our recipe ``name`` for ``llmc.oneshot``, with ``gptq_options`` (None values left out)."""
    text, _ = OURS_RECIPES[name]
    extra = "".join(
        f", {key}: {_yaml(value)}" for key, value in gptq_options.items() if value is not None
    )
    if extra and _GPTQ_OPTIONS not in text:
        given = sorted(key for key, value in gptq_options.items() if value is not None)
        raise ValueError(f"recipe {name!r} has no GPTQModifier for the options {given}")
    return text.replace(_GPTQ_OPTIONS, extra)


def modifiers_of(name: str) -> tuple[str, ...]:
    """The modifier names recipe ``name`` needs from installed plugins."""
    return OURS_RECIPES[name][1]


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
