"""Load the model and tokenizer named by ``ModelArguments``, shared by ``oneshot`` and ``eval``.

The loaders are transformers' own ``AutoModelForCausalLM``/``AutoTokenizer``
(``AutoModelForImageTextToText`` for a vision-language model the first does not map); what this
module adds is the part users trip over: the embedded demo model by name, a dtype chosen by one
word, one-line errors for a missing path, a hub that cannot be reached (decided in a moment
rather than after transformers' ~25 s of retries) or a checkpoint that needs a package not
installed, per-expert MoE checkpoints that transformers reads only fused
(``llmc.moe_checkpoints``), and a ``.gguf`` file given as the model, which transformers reads
only when told its folder and name apart (``gguf_file=``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmc.args import SELF_TEACHER, ModelArguments, upcast_refusal
from llmc.data.presets import asset_path
from llmc.errors import ArgumentError, ModelLoadError, did_you_mean
from llmc.hub import hub_is_reachable
from llmc.lazy_weights import LazyWeights, checkpoint_files
from llmc.quantization.module import EXCLUSIVE

__all__ = [
    "MODEL_PRESETS",
    "TeacherSource",
    "calibration_dtype",
    "cpu_computes_fast_in",
    "default_device",
    "gguf_loaded_bytes",
    "is_gguf_file",
    "load_model",
    "load_skeleton",
    "local_model_folder",
    "load_tokenizer",
    "resolve_model_path",
]

logger = logging.getLogger("llmc.models")

# Preset name → folder under llmc/assets holding a save_pretrained checkpoint.
MODEL_PRESETS: dict[str, str] = {"llmc:tiny-llama": "tiny-llama"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPRESSED_TENSORS = {"compressed-tensors", "compressed_tensors"}


def _looks_like_path(name: str) -> bool:
    """Whether a missing ``name`` was meant as a local folder rather than a hub repository id."""
    if (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    ):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def resolve_model_path(name: str | os.PathLike[str]) -> str:
    """A local folder for presets and paths, or the hub id unchanged.

    Checking local paths here, before transformers sees them, turns a typo in a path into
    "model path './x' does not exist" instead of a hub lookup of a malformed repository id.
    """
    name = os.fspath(name)
    if name in MODEL_PRESETS or name.startswith("llmc:"):
        if name not in MODEL_PRESETS:
            raise ModelLoadError(
                f"unknown model preset {name!r}{did_you_mean(name, MODEL_PRESETS)}"
            )
        folder = asset_path(MODEL_PRESETS[name])
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"the embedded model {name!r} is missing from {folder}; reinstall llmc-core"
            )
        return str(folder)
    local = os.path.expanduser(name)
    if os.path.exists(local):
        if not os.path.isdir(local) and not is_gguf_file(local):
            raise ModelLoadError(
                f"model path {name!r} is a file; pass the folder that holds config.json "
                "(or a .gguf file)"
            )
        return local
    if _looks_like_path(name):
        raise ModelLoadError(f"model path {name!r} does not exist")
    return name


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a GGUF file (llama.cpp's format), which transformers reads whole."""
    return str(path).lower().endswith(".gguf") and os.path.isfile(path)


def _gguf_source(path: str) -> tuple[str, dict[str, Any]]:
    """The folder and loader options for ``path``: a GGUF file is named by ``gguf_file``."""
    if is_gguf_file(path):
        folder, name = os.path.split(os.path.abspath(path))
        return folder, {"gguf_file": name}
    return path, {}


def gguf_loaded_bytes(model_args: ModelArguments) -> int | None:
    """What a ``.gguf`` model takes once transformers has dequantized it (None for others), so
    ``offload='auto'`` can judge whether it fits: the file is 2-8 x smaller than that."""
    if not isinstance(model_args.model, str):
        return None
    path = resolve_model_path(model_args.model)
    if not is_gguf_file(path):
        return None
    try:
        import gguf
    except ImportError:
        return None  # loading it says what to install
    itemsize = _DTYPES.get(model_args.precision, torch.float32).itemsize
    return sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(path).tensors) * itemsize


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """The requested device, else the first GPU when there is one, else the CPU."""
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ArgumentError(
            f"'device' must be a torch device such as 'cpu', 'cuda' or 'cuda:1' (got {requested!r})",
            name="device",
        ) from error
    if device.type == "cuda":
        _check_cuda_device(device, requested)
    return device


def _check_cuda_device(device: torch.device, requested: Any) -> None:
    """Refuse a GPU that is not there before any work, instead of torch's assertion later."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ArgumentError(
            f"'device' {str(requested)!r} needs a CUDA GPU, but torch ({build}) sees none; "
            "use device 'cpu', or install a CUDA build of torch on a machine with a GPU",
            name="device",
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ArgumentError(
            f"'device' {str(requested)!r} names GPU {device.index} but {count} "
            f"{'is' if count == 1 else 'are'} visible (cuda:0 to cuda:{count - 1}); "
            "check CUDA_VISIBLE_DEVICES",
            name="device",
        )


def _offline_message(kind: str, name: str) -> str:
    return (
        f"cannot load {kind} {name!r} from the Hugging Face hub (offline or unreachable); "
        f"pass a local directory with {kind}=path/to/{kind}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _hub_kwargs(path: str, model_args: ModelArguments) -> dict[str, Any]:
    """Keyword arguments shared by the config, model and tokenizer loaders.

    For a hub id while the hub is unreachable, ``local_files_only`` lets a model already in the
    local cache load at once and makes a missing one fail at once.
    """
    is_hub_name = not os.path.isdir(path)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.cache_dir is not None:
        kwargs["cache_dir"] = model_args.cache_dir
    if model_args.revision is not None:
        kwargs["revision"] = model_args.revision
    if is_hub_name and not hub_is_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(kind: str, name: str, kwargs: dict[str, Any], error: Exception) -> ModelLoadError:
    if "gguf_file" in kwargs and isinstance(error, ImportError):
        return ModelLoadError(
            f"reading the GGUF file {name!r} needs the gguf package: pip install gguf "
            "(or llmc-core[gguf])"
        )
    if "trust_remote_code" in str(error) or "contains custom code" in str(error):
        return ModelLoadError(
            f"{kind} {name!r} needs its own Python code to load (auto_map in its config); if you "
            "trust its source, pass --trust-remote-code (Python: trust_remote_code=True)"
        )
    if isinstance(error, SafetensorError):
        return ModelLoadError(
            f"cannot read the weights of {kind} {name!r}: a safetensors file is truncated or "
            f"corrupt ({_first_line(error)}); download or copy it again"
        )
    if kwargs.get("local_files_only") or (
        isinstance(error, OSError) and "connect" in str(error).lower()
    ):
        return ModelLoadError(_offline_message(kind, name))
    return ModelLoadError(f"cannot load {kind} {name!r}: {_first_line(error)}")


def _check_quantization_support(name: str, config: Any) -> None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    method = getattr(method, "value", method)
    if (
        str(method) in _COMPRESSED_TENSORS
        and importlib.util.find_spec("compressed_tensors") is None
    ):
        raise ModelLoadError(
            f"model {name!r} is a compressed-tensors checkpoint but the compressed-tensors package "
            "is not installed; pip install compressed-tensors (or llmc-core[load])"
        )


def _dtype_of(model: torch.nn.Module) -> torch.dtype | None:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def calibration_dtype(
    model_args: ModelArguments, model: torch.nn.Module, device: torch.device | None = None
) -> torch.dtype | None:
    """The dtype calibration forwards autocast to, or None to compute in the model's own.

    Autocast only lowers precision: asked for float32 passes of a half-precision model it would
    disable itself with a warning and compute in half precision, so that request is refused with
    the setting that does it (``precision='float32'``). On a ``device`` that is a CPU without
    matrix instructions for the half-precision dtype the passes compute in, a warning says so:
    such CPUs run those matmuls in a slow fallback, and the run can take many times longer than
    in float32 without a word from torch.
    """
    model_dtype = _dtype_of(model)
    wanted = _DTYPES.get(model_args.calibration_precision)
    if wanted is torch.float32 and model_dtype in _HALF_PRECISIONS:
        raise ArgumentError(upcast_refusal(_dtype_name(model_dtype)), name="calibration_precision")
    compute = None if wanted is None or wanted == model_dtype else wanted
    if device is not None and device.type == "cpu":
        dtype = compute or model_dtype
        if dtype in _HALF_PRECISIONS and not cpu_computes_fast_in(dtype):
            fix = (  # autocast asked for, or the model's own dtype
                "calibration_precision='auto' (--calibration-precision auto)" if compute is not None
                else "precision='float32' (--precision float32)"
            )
            logger.warning(
                "this run computes in %s on a CPU without %s matrix instructions (%s): torch runs "
                "those matmuls in a slow fallback; %s computes in float32 instead",
                _dtype_name(dtype), _dtype_name(dtype), " or ".join(_FAST_CPU_FEATURES[dtype]), fix,
            )
    return compute


_HALF_PRECISIONS = (torch.bfloat16, torch.float16)

# x86 features with which oneDNN (torch's CPU matmuls) computes in each half precision at about
# float32's speed or faster; avx512_bw stands for the AVX-512 core set, on which oneDNN converts
# bf16 to float32 in registers. Without any of them both fall back to an elementwise loop.
_FAST_CPU_FEATURES = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "avx512_bw", "avx_ne_convert"),
    torch.float16: ("avx512_fp16", "amx_fp16", "avx_ne_convert"),
}


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_computes_fast_in(dtype: torch.dtype, capabilities: dict[str, Any] | None = None) -> bool:
    """Whether this CPU (or one with torch's ``capabilities``) has matmul instructions for ``dtype``.

    Only x86 CPUs are judged (torch reports their features); any other answers True.
    """
    if capabilities is None:
        try:
            capabilities = torch.cpu.get_capabilities()
        except (AttributeError, RuntimeError):  # an older torch, or a CPU it cannot query
            return True
    if dtype not in _FAST_CPU_FEATURES or capabilities.get("architecture") != "x86_64":
        return True
    return any(capabilities.get(feature) for feature in _FAST_CPU_FEATURES[dtype])


def _asymmetric_packed_workaround(config: Any) -> dict[str, Any]:
    """Loader options for checkpoints transformers cannot load as they are.

    transformers 5.x + compressed-tensors 0.20 allocate the zero point of asymmetric
    ``pack-quantized`` weights unpacked, then refuse the packed tensor the format prescribes
    (and vLLM reads). Asking for dequantization on load sidesteps it; for weight-only schemes
    (the only ones that pack zero points) the result is the same computation.
    """
    quant = getattr(config, "quantization_config", None)
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return {}
    groups = (quant.get("config_groups") or {}).values()
    asymmetric_packed = any(
        (group.get("weights") or {}).get("symmetric") is False
        and (group.get("format") or quant.get("format")) == "pack-quantized"
        and not group.get("input_activations")
        for group in groups
    )
    if not asymmetric_packed:
        return {}
    from transformers import CompressedTensorsConfig

    logger.info("asymmetric pack-quantized checkpoint: loading it dequantized")
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_model(model_args: ModelArguments, device: torch.device | None = None) -> PreTrainedModel:
    """The causal LM named by ``model_args.model``, in eval mode, on the chosen device
    (``device``, else ``model_args.device``, else the first GPU or the CPU).

    ``precision='auto'`` keeps the checkpoint's dtype (what it was trained or saved in). A model
    object passed in is returned as it is: moving or casting it would silently change the
    caller's object, and its placement (possibly across devices) is the caller's decision.
    """
    model = model_args.model
    if model is None:
        raise ArgumentError(
            "no model given; pass model= a local directory, a hub name or 'llmc:tiny-llama'",
            name="model",
        )
    if not isinstance(model, str):
        wanted = _DTYPES.get(model_args.precision)
        if wanted is not None and _dtype_of(model) not in (None, wanted):
            logger.warning(
                "precision=%r is not applied to a model object (it is %s); cast it with "
                "model.to(torch.%s) before passing it",
                model_args.precision,
                _dtype_of(model),
                model_args.precision,
            )
        return model
    resolved = resolve_model_path(model)
    path, gguf = _gguf_source(resolved)
    device = device or default_device(model_args.device)
    kwargs = {**_hub_kwargs(path, model_args), **gguf}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise _load_error("model", model, kwargs, error) from error
    _check_quantization_support(model, config)
    kwargs.update(_asymmetric_packed_workaround(config))
    dtype = "auto" if model_args.precision == "auto" else _DTYPES[model_args.precision]
    dtype = _decompression_dtype(config, dtype)
    if gguf:
        logger.info(
            "%s: transformers dequantizes its tensors to %s; quantized ones keep their values on "
            "the file's grid", gguf["gguf_file"], "float32" if dtype == "auto" else _dtype_name(dtype),
        )
    loader = _loader(resolved, config)  # a GGUF file is not a folder: the auto class
    try:
        loaded = loader.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as error:
        raise _load_error("model", model, kwargs, error) from error
    if gguf:
        _drop_gguf_marker(loaded)
    loaded.eval()
    if any(p.device != device for p in loaded.parameters()):
        loaded.to(device)
    _mark_exclusive_parameters(loaded)
    return loaded


def _drop_gguf_marker(model: PreTrainedModel) -> None:
    """Make a model transformers read from a GGUF file the dense model it is in memory.

    transformers marks it as quantized with GGUF (``quantization_config``, ``hf_quantizer``)
    although its weights are dequantized: saving it is then refused, the Trainer refuses to
    fine-tune it, and it would look like a quantized checkpoint to the rest of the run.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _auto_class(config: Any) -> tuple[Any, Any]:
    """``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language model
    that only it maps (Qwen2.5-VL), whose language model is then the one compressed; with the
    mapping from config classes to model classes it reads."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        AutoModelForImageTextToText,
    )

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    return AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING


def _loader(path: str, config: Any) -> Any:
    """What loads the checkpoint at ``path``: the auto class, or for a checkpoint naming experts
    one by one where transformers reads them fused, the model class unfusing them when built
    (``llmc.moe_checkpoints``)."""
    from llmc.moe_checkpoints import unfusing_model_class

    auto, mapping = _auto_class(config)
    if not os.path.isdir(path) or type(config) not in mapping:
        return auto
    unfusing = unfusing_model_class(Path(path), config, mapping[type(config)])
    if unfusing is not None:
        logger.info("the checkpoint names each expert: building %s with per-expert Linears", unfusing.__name__)
        return unfusing
    return auto


# Formats compressed-tensors 0.20 decompresses to bfloat16 whatever the model's dtype.
_BFLOAT16_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")


def _decompression_dtype(config: Any, dtype: Any) -> Any:
    """bfloat16 for a checkpoint in a format compressed-tensors decompresses to bfloat16, when
    the model would otherwise load in float32 (its first matmul would fail on mixed dtypes);
    the weights' values are bfloat16-exact, only the activations lose precision."""
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, dict):
        quantization = getattr(quantization, "to_dict", lambda: {})()
    formats = {quantization.get("format")} | {
        group.get("format") for group in (quantization.get("config_groups") or {}).values()
        if isinstance(group, dict)
    }
    if not formats & set(_BFLOAT16_FORMATS):
        return dtype
    wanted = dtype if dtype != "auto" else getattr(config, "dtype", None)
    if wanted in (torch.float32, "float32", None):
        logger.info(
            "the checkpoint's %s weights decompress to bfloat16 in compressed-tensors: loading "
            "the model in bfloat16", ", ".join(sorted(f for f in formats if f in _BFLOAT16_FORMATS))
        )
        return torch.bfloat16
    return dtype


def local_model_folder(model_args: ModelArguments) -> Path | None:
    """The local folder of a model given by path or preset (None for a hub name or object)."""
    if not isinstance(model_args.model, str):
        return None
    path = resolve_model_path(model_args.model)
    return Path(path) if os.path.isdir(path) else None


def load_skeleton(model_args: ModelArguments) -> tuple[PreTrainedModel, LazyWeights] | str:
    """The model with its parameters on the meta device and the map of where they are in its
    files (``llmc.lazy_weights``), or why it cannot be read a layer at a time."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    folder = local_model_folder(model_args)
    if folder is None:
        return "the model is not a local folder (download it and pass its path)"
    files = checkpoint_files(folder)
    if isinstance(files, str):
        return files
    kwargs = _hub_kwargs(str(folder), model_args)
    try:
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise _load_error("model", model_args.model, kwargs, error) from error
    if getattr(config, "quantization_config", None) is not None:
        return "it is a quantized checkpoint"
    dtype = _DTYPES.get(model_args.precision) or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = _auto_class(config)[0].from_config(
                config, dtype=dtype, trust_remote_code=model_args.trust_remote_code
            )
    except (OSError, ValueError, KeyError, ImportError, TypeError) as error:
        return f"transformers cannot build it without its weights ({_first_line(error)})"
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    from llmc.moe import find_fused_experts

    if find_fused_experts(model):
        return "its experts are fused 3-D weights, which are unfused from their values"
    weights = LazyWeights.open(model, files)
    if isinstance(weights, str):
        return weights
    return model, weights


def _mark_exclusive_parameters(model: torch.nn.Module) -> None:
    """Flag the parameters no other parameter shares storage with (not tied), as ``EXCLUSIVE``.

    transformers maps safetensors files into memory copy-on-write; a compressed weight written
    *into* its parameter takes over those pages, while one assigned as a new tensor leaves the
    file pages resident next to it (measured: 1.8 GB instead of 1.1 GB peak for a 790 MB
    model). Writing in place is only safe when nothing else reads the same storage, and only
    this loader knows that for sure; models passed in as objects are never flagged.
    """
    owners = Counter(
        p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False)
    )
    for parameter in model.parameters():
        if owners[parameter.untyped_storage().data_ptr()] == 1:
            setattr(parameter, EXCLUSIVE, True)


def load_tokenizer(model_args: ModelArguments, model: Any = None) -> Any:
    """The tokenizer from ``model_args.tokenizer``, else from where the model was loaded.

    A tokenizer object passed in is returned as it is. For a model object, the folder it was
    loaded from (``config._name_or_path``) is used, since a model object does not carry one.
    """
    tokenizer = model_args.tokenizer
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer
    if source is None and isinstance(model_args.model, str):
        source = model_args.model
    if source is None and model is not None:
        config = getattr(model, "config", None)
        source = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source:
        raise ArgumentError(
            "cannot tell where the tokenizer is: the model object records no path; "
            "pass tokenizer=path/to/tokenizer",
            name="tokenizer",
        )
    path, gguf = _gguf_source(resolve_model_path(source))
    kwargs = {**_hub_kwargs(path, model_args), **gguf}
    if tokenizer is not None:
        kwargs.pop("revision", None)  # the revision names a commit of the model repository
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as error:
        raise _load_error("tokenizer", source, kwargs, error) from error


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@attrs.define
class TeacherSource:
    """The ``distill_teacher`` of a run, as ``RunContext.teacher`` hands it to modifiers.

    ``"self"`` is a frozen deep copy of the model taken when this object is made (before the
    recipe's first stage changes anything), placed on the teacher device at once, so it never
    takes room on the student's device during one-shot stages; a model object is frozen and
    moved; a path or hub name is loaded like the model, with the model's precision, on each
    call. ``release()`` drops what is held once no later stage needs it.
    """

    model_args: ModelArguments
    device: torch.device
    held: torch.nn.Module | None = None

    @classmethod
    def for_run(cls, model_args: ModelArguments, model: torch.nn.Module) -> TeacherSource:
        device = default_device(model_args.distill_teacher_device or next(model.parameters()).device)
        source = cls(model_args, device)
        teacher = model_args.distill_teacher
        if teacher == SELF_TEACHER:
            source.held = _frozen(copy.deepcopy(model).to(device))
        elif not isinstance(teacher, (str, os.PathLike)):
            source.held = _frozen(teacher.to(device))
        return source

    def __call__(self) -> torch.nn.Module:
        if self.held is not None:
            return self.held
        teacher_args = attrs.evolve(
            self.model_args, model=self.model_args.distill_teacher, device=str(self.device),
            distill_teacher=None, revision=None,
        )
        return _frozen(load_model(teacher_args))

    def release(self) -> None:
        self.held = None
