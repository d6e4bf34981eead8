"""The arguments of the entrypoints, in one place.

The Python API (``oneshot(**kwargs)``), config files (``--config run.yaml``) and the CLI flags are
all generated from the attrs fields below, so the three can never drift apart. One cattrs
converter structures keyword arguments into these classes; an unknown name is refused with the
closest valid name and a wrong type names the field, what it expects and what it got.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import cattrs

from llmc.converters import error_text, make_converter, validation_problems
from llmc.errors import ArgumentError, did_you_mean, names_with_closest
from llmc.validators import OneOf

__all__ = [
    "ARGUMENT_CLASSES",
    "DatasetArguments",
    "LR_SCHEDULER_TYPES",
    "ModelArguments",
    "OutputArguments",
    "PRECISIONS",
    "RecipeArguments",
    "SELF_TEACHER",
    "TRAIN_ARGUMENT_CLASSES",
    "TrainingArguments",
    "parse_arguments",
    "unknown_names_message",
]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
LAYER_INPUTS = ("memory", "disk")
SELF_TEACHER = "self"


def _help(text: str, *, cli: bool = True, cli_type: str | None = None) -> dict[str, Any]:
    """Field metadata read by the CLI generator: help text, and how the flag is typed."""
    return {"help": text, "cli": cli, "cli_type": cli_type}


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ArgumentError(
            f"'{attribute.name}' must be a positive integer (got {value!r})", name=attribute.name
        )


def _model_like(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and not value.strip():
        raise ArgumentError(
            f"'{attribute.name}' is empty; pass a local directory, a hub name or llmc:tiny-llama",
            name=attribute.name,
        )
    if value is None or isinstance(value, (str, os.PathLike)):
        return
    if hasattr(value, "forward") and hasattr(value, "named_modules"):
        return
    raise ArgumentError(
        f"'{attribute.name}' must be a local path, a hub name or a loaded model "
        f"(got {type(value).__name__})",
        name=attribute.name,
    )


def _path_or_none(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def upcast_refusal(model_dtype: str) -> str:
    """Why ``calibration_precision='float32'`` cannot apply to a model of ``model_dtype``."""
    return (
        f"calibration_precision='float32' cannot raise the passes of a {model_dtype} model above "
        "its dtype (autocast only lowers precision); load it in float32 with precision='float32'"
    )


def _not_above_precision(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    """Refused here when ``precision`` names the dtype; ``calibration_dtype`` checks a loaded one."""
    if value == "float32" and instance.precision in ("bfloat16", "float16"):
        raise ArgumentError(upcast_refusal(instance.precision), name=attribute.name)


@attrs.frozen(kw_only=True)
class ModelArguments:
    """Which model to compress and how to load it."""

    model: Any = attrs.field(
        default=None,
        converter=_path_or_none,
        validator=_model_like,
        metadata=_help(
            "model to compress: a local directory, a hub name, a .gguf file, or (from Python) a "
            "loaded model; 'llmc:tiny-llama' is the embedded demo model",
            cli_type="str",
        ),
    )
    tokenizer: Any = attrs.field(
        default=None,
        converter=_path_or_none,
        metadata=_help("tokenizer path or hub name (default: the model's)", cli_type="str"),
    )
    precision: str = attrs.field(
        default="auto",
        validator=OneOf(PRECISIONS),
        metadata=_help(f"dtype to load the model in: {', '.join(PRECISIONS)}"),
    )
    calibration_precision: str = attrs.field(
        default="auto",
        validator=[OneOf(PRECISIONS), _not_above_precision],
        metadata=_help(
            "dtype the calibration forward passes compute in (autocast): auto = the model's own; "
            "bfloat16 roughly halves them on CPUs with native bf16 and on GPUs. Never above the "
            "model's dtype (for float32 passes of a bf16 model, use precision=float32). Weights, "
            "Hessians and the checkpoint keep their dtype"
        ),
    )
    moe_calibrate_all_experts: bool = attrs.field(
        default=True,
        metadata=_help(
            "in calibration passes, run every token through every expert of a mixture-of-experts "
            "layer, so each expert is calibrated on all tokens (the layer output still uses only "
            "the routed experts); off calibrates each expert on the tokens routed to it, and an "
            "expert no token reaches is handled by each modifier's fallback"
        ),
    )
    device: str | None = attrs.field(
        default=None,
        metadata=_help("device for calibration (default: the model's, else cuda if present, else cpu)"),
    )
    offload: str = attrs.field(
        default="auto",
        validator=OneOf(OFFLOAD_MODES),
        metadata=_help(
            "where the weights live during the run: none (all on the device), cpu (in host "
            "memory, each layer moved to the device for its passes), disk (each layer read from "
            "the model's files when reached and written to the output when done; resumable), "
            "auto (none when the model fits, else cpu or disk)"
        ),
    )
    layer_inputs: str = attrs.field(
        default="memory",
        validator=OneOf(LAYER_INPUTS),
        metadata=_help(
            "where the activations passed from layer to layer are kept: memory (host memory), "
            "disk (files of a streamed run's work folder, memory-mapped, so the kernel can drop "
            "their pages instead of running out of memory; needs offload=disk)"
        ),
    )
    cache_dir: str | None = attrs.field(
        default=None, converter=_path_or_none, metadata=_help("where hub downloads are cached")
    )
    revision: str | None = attrs.field(
        default=None, metadata=_help("hub revision (branch, tag or commit) of the model")
    )
    trust_remote_code: bool = attrs.field(
        default=False,
        metadata=_help("run model code shipped with a hub repository (off unless asked)"),
    )
    save_compressed: bool = attrs.field(
        default=True,
        metadata=_help("pack quantized weights (compressed-tensors); off writes dense fake-quantized weights"),
    )
    distill_teacher: Any = attrs.field(
        default=None,
        converter=_path_or_none,
        validator=_model_like,
        metadata=_help(
            "teacher of a distillation modifier (train): a local directory, a hub name, (from "
            f"Python) a loaded model, or {SELF_TEACHER!r}: a frozen copy of the model before the "
            "recipe's first stage",
            cli_type="str",
        ),
    )
    distill_teacher_device: str | None = attrs.field(
        default=None,
        metadata=_help("device the teacher runs on (default: the model's), e.g. 'cpu' or 'cuda:1'"),
    )


@attrs.frozen(kw_only=True)
class DatasetArguments:
    """Which calibration data to use and how to cut it into samples."""

    dataset: Any = attrs.field(
        default=None,
        converter=_path_or_none,
        metadata=_help(
            "calibration data: a hub name, a local json/jsonl/csv/parquet/txt file or folder, a "
            "registered preset such as 'llmc:stdlib-docs', or (from Python) a datasets.Dataset",
            cli_type="str",
        ),
    )
    dataset_config_name: str | None = attrs.field(
        default=None, metadata=_help("configuration name of a hub dataset")
    )
    dataset_path: str | None = attrs.field(
        default=None,
        converter=_path_or_none,
        metadata=_help("local file or folder to load the data from (instead of --dataset)"),
    )
    splits: str | None = attrs.field(
        default=None,
        metadata=_help("split to calibrate on, e.g. 'train' or 'train[:10%]' (default: train)"),
    )
    text_column: str = attrs.field(default="text", metadata=_help("column holding the raw text"))
    num_calibration_samples: int = attrs.field(
        default=512, validator=_positive, metadata=_help("number of calibration samples")
    )
    max_seq_length: int = attrs.field(
        default=384, validator=_positive, metadata=_help("tokens per sample (longer ones are cut)")
    )
    shuffle_calibration_samples: bool = attrs.field(
        default=True, metadata=_help("shuffle (seeded) before taking the samples")
    )
    seed: int = attrs.field(
        default=42,
        metadata=_help("seed of the shuffle (train: also of the Trainer, its batch order and dropout)"),
    )
    preprocessing_func: Any = attrs.field(
        default=None,
        metadata=_help(
            "function applied to each example before tokenization; from the CLI 'module:function'",
            cli_type="str",
        ),
    )
    concatenate_data: bool = attrs.field(
        default=False,
        metadata=_help("join all texts and cut them into samples of exactly max_seq_length tokens"),
    )
    batch_size: int = attrs.field(
        default=1, validator=_positive, metadata=_help("samples per calibration forward pass")
    )
    sequential_targets: list[str] | None = attrs.field(
        default=None,
        metadata=_help(
            "module names or class names of the blocks calibrated one at a time "
            "(default: the model's decoder layers)",
            cli_type="list",
        ),
    )


@attrs.frozen(kw_only=True)
class RecipeArguments:
    """What to do to the model."""

    recipe: Any = attrs.field(
        default=None,
        metadata=_help(
            "a recipe YAML file, a YAML string, or a shipped recipe name such as 'llmc:w4a16'; "
            "from Python also a modifier or a list of modifiers",
            cli_type="str",
        ),
    )
    recipe_args: dict[str, Any] | None = attrs.field(
        default=None,
        metadata=_help(
            "values that override the recipe: {'scheme': 'W8A16'} sets that field in every "
            "modifier that has it, {'quant_stage.quant_modifiers.QuantizationModifier.scheme': ...} "
            "sets one",
            cli_type="mapping",
        ),
    )
    stage: str | None = attrs.field(default=None, metadata=_help("run only this recipe stage"))


@attrs.frozen(kw_only=True)
class OutputArguments:
    """Where the compressed checkpoint goes."""

    output_dir: str | None = attrs.field(
        default=None,
        converter=_path_or_none,
        metadata=_help("directory for the compressed checkpoint (nothing is saved without it)"),
    )
    overwrite: bool = attrs.field(
        default=False, metadata=_help("replace an existing non-empty output directory")
    )
    resume: bool = attrs.field(
        default=True,
        metadata=_help(
            "continue an interrupted streamed run (offload=disk) for the same output at its first "
            "unfinished layer when nothing it depends on changed; --no-resume starts over"
        ),
    )


def _positive_number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ArgumentError(
            f"'{attribute.name}' must be a positive number (got {value!r})", name=attribute.name
        )


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise ArgumentError(f"'{attribute.name}' must be 0 or more (got {value!r})", name=attribute.name)


# transformers' ``SchedulerType`` values that need nothing but the step count (a test checks
# that transformers still has each); others go through ``trainer_args``' ``lr_scheduler_kwargs``.
LR_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# The deprecated ``lr_scheduler`` alias, with the meaning it had: linear warmup, then the schedule.
LR_SCHEDULES = ("cosine", "linear", "constant")
_LR_SCHEDULE_TYPES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
RESUME_LATEST = "latest"


def _resume_point(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or value is True or value is False:
        return
    if isinstance(value, str) and value.strip():
        return
    raise ArgumentError(
        f"'{attribute.name}' must be true, {RESUME_LATEST!r} or the path of a checkpoint-N folder "
        f"(got {value!r})",
        name=attribute.name,
    )


def _mapping_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        raise ArgumentError(
            f"'{attribute.name}' must be a mapping of transformers.TrainingArguments field names "
            f"to values (got {value!r})",
            name=attribute.name,
        )


@attrs.frozen(kw_only=True)
class TrainingArguments:
    """How ``train`` fine-tunes the model while the recipe's training modifiers are active.

    Training runs on ``transformers.Trainer``: these fields have the names, and the meaning, of
    ``transformers.TrainingArguments`` fields (``output_dir`` and ``seed`` are shared with the
    other argument classes: the checkpoint's directory, and the seed of the data shuffle and of
    the Trainer). Every other valid ``transformers.TrainingArguments`` field can be passed in
    ``trainer_args``.
    """

    num_train_epochs: float = attrs.field(
        default=1.0, converter=float, validator=_positive_number,
        metadata=_help("passes over the training samples (ignored when max_steps is set)"),
    )
    max_steps: int | None = attrs.field(
        default=None, validator=_positive, metadata=_help("optimizer steps to run (overrides epochs)")
    )
    max_train_samples: int | None = attrs.field(
        default=None, validator=_positive,
        metadata=_help("use at most this many training samples (default: all)"),
    )
    per_device_train_batch_size: int = attrs.field(
        default=4, validator=_positive, metadata=_help("samples per forward pass in training")
    )
    gradient_accumulation_steps: int = attrs.field(
        default=1, validator=_positive, metadata=_help("forward passes per optimizer step")
    )
    learning_rate: float = attrs.field(
        default=2e-5, converter=float, validator=_positive_number, metadata=_help("peak learning rate (AdamW)")
    )
    weight_decay: float = attrs.field(
        default=0.0, converter=float, validator=_non_negative,
        metadata=_help("AdamW weight decay (not applied to biases and norms)"),
    )
    lr_scheduler_type: str = attrs.field(
        default="cosine", validator=OneOf(LR_SCHEDULER_TYPES),
        metadata=_help("learning-rate schedule (transformers' names; 'constant' ignores warmup)"),
    )
    lr_scheduler: str | None = attrs.field(
        default=None, validator=OneOf(LR_SCHEDULES, allow_none=True),
        metadata=_help(
            "deprecated, use lr_scheduler_type: the schedule after warmup ('constant' is "
            "lr_scheduler_type constant_with_warmup)"
        ),
    )
    warmup_steps: int = attrs.field(
        default=0, validator=_non_negative, metadata=_help("linear warmup steps")
    )
    max_grad_norm: float = attrs.field(
        default=1.0, converter=float, validator=_non_negative, metadata=_help("gradient clipping (0: off)")
    )
    bf16: bool = attrs.field(
        default=False, metadata=_help("run forward passes under bfloat16 autocast")
    )
    logging_steps: int = attrs.field(
        default=10, validator=_positive, metadata=_help("log the loss every this many steps")
    )
    save_steps: int | None = attrs.field(
        default=None, validator=_positive,
        metadata=_help(
            "save a Trainer checkpoint (weights, optimizer, schedule, RNG) every this many steps, "
            "to resume from; they go to a scratch folder beside output_dir"
        ),
    )
    resume_from_checkpoint: Any = attrs.field(
        default=None, converter=_path_or_none, validator=_resume_point,
        metadata=_help(
            f"continue an interrupted run: {RESUME_LATEST!r} (Python: True) takes the last "
            "checkpoint save_steps wrote for the same output_dir, or give a checkpoint-N folder",
            cli_type="str",
        ),
    )
    report_to: list[str] = attrs.field(
        factory=lambda: ["none"],
        metadata=_help("experiment trackers the Trainer logs to (transformers' names: none, all, tensorboard, ...)"),
    )
    trainer_args: dict[str, Any] | None = attrs.field(
        default=None, validator=_mapping_or_none,
        metadata=_help(
            "any other transformers.TrainingArguments fields, e.g. {'optim': 'adafactor', "
            "'gradient_checkpointing': True}",
            cli_type="mapping",
        ),
    )

    def __attrs_post_init__(self) -> None:
        if self.lr_scheduler is not None and self.lr_scheduler_type != "cosine":
            raise ArgumentError(
                "'lr_scheduler' is the deprecated name of 'lr_scheduler_type'; give only "
                f"lr_scheduler_type (got lr_scheduler={self.lr_scheduler!r}, "
                f"lr_scheduler_type={self.lr_scheduler_type!r})",
                name="lr_scheduler",
            )

    @property
    def scheduler_type(self) -> str:
        """The transformers ``lr_scheduler_type`` to use, the deprecated alias resolved."""
        if self.lr_scheduler is not None:
            return _LR_SCHEDULE_TYPES[self.lr_scheduler]
        return self.lr_scheduler_type

    @property
    def resume_latest(self) -> bool:
        return self.resume_from_checkpoint is True or self.resume_from_checkpoint == RESUME_LATEST


ARGUMENT_CLASSES: tuple[type, ...] = (
    ModelArguments,
    DatasetArguments,
    RecipeArguments,
    OutputArguments,
)
TRAIN_ARGUMENT_CLASSES: tuple[type, ...] = (*ARGUMENT_CLASSES, TrainingArguments)


# Fields typed Any keep Python objects (a model, a Dataset, a modifier list) as they are.
CONVERTER = make_converter()


def field_owner(classes: tuple[type, ...] = ARGUMENT_CLASSES) -> dict[str, type]:
    """Map each argument name to the class that holds it."""
    owners: dict[str, type] = {}
    for cls in classes:
        for field in attrs.fields(cls):
            owners[field.name] = cls
    return owners


def structure_one(cls: type, values: Mapping[str, Any]) -> Any:
    """Build one argument class, turning attrs/cattrs failures into one-line ArgumentErrors."""
    try:
        return CONVERTER.structure(dict(values), cls)
    except ArgumentError:
        raise
    except cattrs.BaseValidationError as error:
        for leaf in _leaf_exceptions(error):
            if isinstance(leaf, ArgumentError):
                raise leaf from None
        problems = validation_problems(error, values)
        text = "; ".join(f"'{field}': {message}" if field else message for field, message in problems)
        raise ArgumentError(text, name=problems[0][0] or None) from None
    except (TypeError, ValueError) as error:
        raise ArgumentError(error_text(error)) from None


def _leaf_exceptions(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for sub in error.exceptions:
            leaves.extend(_leaf_exceptions(sub))
        return leaves
    return [error]


def unknown_names_message(unknown: Sequence[str], valid: Iterable[str], *, kind: str = "argument") -> str:
    """Every unknown name in one line, each with the closest valid one.

    One name: ``unknown argument 'modle'; did you mean 'model'?``; several:
    ``2 unknown arguments: 'modle' (did you mean 'model'?), 'recipie' (did you mean 'recipe'?)``.
    """
    valid = sorted(set(valid))
    if len(unknown) == 1:
        return f"unknown {kind} {unknown[0]!r}{did_you_mean(unknown[0], valid)}"
    return f"{len(unknown)} unknown {kind}s: {names_with_closest(unknown, valid)}"


def parse_arguments(
    values: Mapping[str, Any], classes: tuple[type, ...] = ARGUMENT_CLASSES
) -> tuple[Any, ...]:
    """Sort keyword arguments into the argument classes, refusing unknown names.

    Why one flat namespace: users write ``oneshot(model=..., recipe=..., dataset=...)`` (as in
    llm-compressor) without knowing which class holds which field.
    """
    owners = field_owner(classes)
    unknown = [name for name in values if name not in owners]
    if unknown:
        raise ArgumentError(unknown_names_message(unknown, owners), name=unknown[0])
    grouped: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for name, value in values.items():
        grouped[owners[name]][name] = value
    return tuple(structure_one(cls, grouped[cls]) for cls in classes)
