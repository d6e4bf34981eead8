"""The ``llmc`` command.

The flags of ``llmc oneshot`` are generated from the attrs fields in ``llmc.args``, so the CLI,
config files and the Python API accept exactly the same names. Bad input prints one line
(``llmc: error: ...``) and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import collections.abc
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from llmc.args import (
    ARGUMENT_CLASSES,
    PRECISIONS,
    TRAIN_ARGUMENT_CLASSES,
    field_owner,
    parse_arguments,
    unknown_names_message,
)
from llmc.errors import ArgumentError, LlmcError, closest, did_you_mean
from llmc.validators import OneOf

__all__ = ["LlmcArgumentParser", "build_parser", "main"]

logger = logging.getLogger("llmc")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@attrs.frozen
class _FlagType:
    """How a flag's text is read, and how an error names the form it expects.

    Used as an argparse ``type``: a ``TypeError``/``ValueError`` from ``read`` becomes
    ``--flag expects <expects> (got '<text>')``.
    """

    read: Callable[[str], Any]
    expects: str
    expects_many: str

    def __call__(self, text: str) -> Any:
        try:
            return self.read(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expects {self.expects} (got {text!r})") from None


def _read_mapping(text: str) -> dict[str, Any]:
    """``key=value`` (value read as a YAML scalar) or a YAML mapping."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    yaml = YAML(typ="safe", pure=True)
    try:
        if "=" in text and not text.lstrip().startswith("{"):
            key, _, value = text.partition("=")
            if not key.strip():
                raise ValueError("no key")
            return {key.strip(): yaml.load(value) if value.strip() else None}
        loaded = yaml.load(text)
    except YAMLError:
        raise ValueError("not YAML") from None
    if not isinstance(loaded, dict):
        raise ValueError("not a mapping")
    return loaded


_integer = _FlagType(int, "an integer", "integers")
_number = _FlagType(float, "a number", "numbers")
# ``--recipe-args`` takes ``key=value`` or a YAML mapping; repeated flags merge.
_parse_mapping = _FlagType(_read_mapping, "KEY=VALUE pairs", "KEY=VALUE pairs")
_ITEM_TYPES: dict[Any, _FlagType] = {int: _integer, float: _number}


def _expected_form(action: argparse.Action) -> str:
    """What a flag accepts, in words: 'an integer', 'one or more values', 'one of 'a', 'b''."""
    if action.choices is not None:
        return "one of " + ", ".join(repr(choice) for choice in action.choices)
    kind = action.type if isinstance(action.type, _FlagType) else None
    if action.nargs in ("+", "*"):
        return f"one or more {kind.expects_many if kind else 'values'}"
    return kind.expects if kind else "a value"


class LlmcArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one-line ``ArgumentError``s, never usage text.

    argparse's own errors (a value of the wrong type, a missing value, an invalid choice, an
    unknown command) are raised as ``ArgumentError("--flag expects ... (got ...)")``; ``main``
    prints that line and exits with status 2. ``--help`` still prints help and exits 0.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as error:
            raise ArgumentError(self._describe(error), name=error.argument_name) from None

    def error(self, message: str) -> typing.NoReturn:
        # What argparse reports without naming an action: a required flag, an ambiguous prefix.
        raise ArgumentError(message)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        names = [str(choice) for choice in action.choices]
        if action.dest == "command":
            raise ArgumentError(
                f"unknown command {value!r}{did_you_mean(str(value), names)} (see: llmc --help)",
                name=str(value),
            )
        match = closest(str(value), names)
        raise argparse.ArgumentError(
            action,
            f"must be {_expected_form(action)} (got {value!r})"
            + (f"; did you mean {match!r}?" if match else ""),
        )

    def _describe(self, error: argparse.ArgumentError) -> str:
        """``--flag <what went wrong>``, from argparse's error and the flag's expected form."""
        name, message = error.argument_name, error.message
        if name is None:
            return message
        flag = name.split("/")[0]
        action = self._option_string_actions.get(flag)
        if message.startswith(("expects ", "must be ")):
            return f"{flag} {message}"
        if action is not None and message.startswith("expected "):  # expected one argument, ...
            return f"{flag} expects {_expected_form(action)} (got no value)"
        if action is not None and message.startswith("ignored explicit argument"):
            value = message.rpartition(" ")[2]
            flags = " or ".join(action.option_strings)
            return f"{flag} takes no value (got {value}); use {flags}"
        return f"{flag}: {message}"


def _add_global_flags(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """Flags accepted before and after the command: ``llmc -q oneshot`` = ``llmc oneshot -q``."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings only")


class _MergeMapping(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        merged = dict(getattr(namespace, self.dest) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


# How a field typed ``Any`` (a Python object from the API) is read on the command line.
_CLI_TYPES: dict[str, Any] = {"str": str, "list": list[str], "mapping": dict[str, Any]}


def _flag_type(cls: type, field: attrs.Attribute, annotation: Any) -> Any:
    """The type a flag parses: the field's resolved type, ``X | None`` read as ``X``.

    A field typed ``Any`` takes its command-line form from the ``cli_type`` metadata (``str``
    when absent), since its Python type says nothing about it.
    """
    if annotation is Any:
        return _CLI_TYPES[field.metadata.get("cli_type") or "str"]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
        raise TypeError(
            f"cannot make a flag for {cls.__name__}.{field.name}: it is typed {annotation}; "
            "use one type (or X | None), or set cli=False in its metadata"
        )
    return annotation


def _add_argument_fields(parser: argparse.ArgumentParser, classes: Sequence[type]) -> None:
    """One flag per field, typed from the field's annotation (``bool`` gives --x/--no-x)."""
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        annotations = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            meta = field.metadata
            if not meta.get("cli", True):
                continue
            help_text = meta.get("help", "").replace("%", "%%")
            flag = _flag(field.name)
            kind = _flag_type(cls, field, annotations[field.name])
            origin = typing.get_origin(kind) or kind
            if kind is bool:
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=f"{help_text} (default: {field.default})")
            elif kind in (int, float):
                group.add_argument(flag, dest=field.name, type=_ITEM_TYPES[kind], default=None,
                                   help=f"{help_text} (default: {field.default})")
            elif origin in (list, tuple, collections.abc.Sequence):
                item = (typing.get_args(kind) or (str,))[0]
                group.add_argument(flag, dest=field.name, nargs="+", default=None, help=help_text,
                                   type=_ITEM_TYPES.get(item))
            elif origin in (dict, collections.abc.Mapping):
                group.add_argument(flag, dest=field.name, type=_parse_mapping, action=_MergeMapping,
                                   default=None, metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
            elif kind is str or origin is typing.Literal:
                choices = typing.get_args(kind) if origin is typing.Literal else None
                if isinstance(field.validator, OneOf):
                    choices = field.validator.options
                default = field.default if field.default is not None else None
                suffix = f" (default: {default})" if default not in (None, attrs.NOTHING) else ""
                group.add_argument(flag, dest=field.name, default=None, choices=choices,
                                   help=help_text + suffix)
            else:
                raise TypeError(
                    f"cannot make a flag for {cls.__name__}.{field.name} of type {kind}; "
                    "set cli=False in its metadata"
                )


def _read_config(path: str) -> dict[str, Any]:
    """A YAML or JSON file of argument names to values (dashes or underscores)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if not os.path.isfile(path):
        raise ArgumentError(f"config file {path!r} does not exist", name="config")
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = YAML(typ="safe", pure=True).load(handle)
    except YAMLError as error:
        raise ArgumentError(f"config file {path!r} is not valid YAML: {error}".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ArgumentError(f"config file {path!r} must hold a mapping of argument names to values")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def _collect(namespace: argparse.Namespace, classes: Sequence[type]) -> dict[str, Any]:
    """Config-file values overridden by the flags that were given."""
    values: dict[str, Any] = {}
    owners = field_owner(tuple(classes))
    if getattr(namespace, "config", None):
        values.update(_read_config(namespace.config))
        unknown = [name for name in values if name not in owners]
        if unknown:
            raise ArgumentError(
                f"config file {namespace.config!r}: {unknown_names_message(unknown, owners)}",
                name=unknown[0],
            )
    for name in owners:
        value = getattr(namespace, name, None)
        if value is not None:
            values[name] = value
    return values


def _refuse_unknown(unknown: list[str], parser: argparse.ArgumentParser) -> None:
    if not unknown:
        return
    flags = [opt for action in parser._actions for opt in action.option_strings]
    options = [item.split("=")[0] for item in unknown if item.startswith("-") and not _is_number(item)]
    if options:
        raise ArgumentError(unknown_names_message(options, flags, kind="option"), name=options[0])
    raise ArgumentError(f"unexpected argument {unknown[0]!r}", name=unknown[0])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = LlmcArgumentParser(
        prog="llmc", description="Compress Hugging Face language models with recipes and plugins."
    )
    _add_global_flags(parser, default=False)
    # Not required=True: no command gets its own message in main, not argparse's.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=LlmcArgumentParser)

    oneshot = commands.add_parser(
        "oneshot", help="calibrate and compress a model (no training)",
        description="Calibrate and compress a model with a recipe, then save a compressed-tensors checkpoint.",
    )
    oneshot.add_argument("--config", help="YAML/JSON file of arguments; flags override it")
    _add_argument_fields(oneshot, ARGUMENT_CLASSES)

    train = commands.add_parser(
        "train", help="fine-tune a model with the recipe's training modifiers active",
        description="Fine-tune a model (optionally after one-shot stages) and save the checkpoint.",
    )
    train.add_argument("--config", help="YAML/JSON file of arguments; flags override it")
    _add_argument_fields(train, TRAIN_ARGUMENT_CLASSES)

    evaluate = commands.add_parser("eval", help="perplexity of a model or checkpoint on held-out text")
    evaluate.add_argument("--model", required=True, help="checkpoint directory, hub name, or llmc:tiny-llama")
    evaluate.add_argument("--dataset", default=None, help="text to evaluate on (default: llmc:stdlib-docs-heldout)")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--max-seq-length", type=_integer, default=512)
    evaluate.add_argument("--batch-size", type=_integer, default=8)
    evaluate.add_argument("--max-chunks", type=_integer, default=None, help="evaluate at most this many chunks")
    evaluate.add_argument("--precision", default="auto", choices=PRECISIONS)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--trust-remote-code", action="store_true")

    commands.add_parser("plugins", help="list installed plugins, their versions and modifiers")
    commands.add_parser("recipes", help="list the shipped recipes (use them as llmc:<name>)")

    demo = commands.add_parser(
        "demo", help="compress the embedded tiny model (RTN, GPTQ, W8A8, SparseGPT 2:4) and show what changed"
    )
    demo.add_argument("--output-dir", default="llmc-demo", help="where the checkpoints go")
    demo.add_argument("--num-calibration-samples", type=_integer, default=64)
    demo.add_argument("--max-chunks", type=_integer, default=64, help="held-out chunks of 512 tokens to evaluate")
    for command in commands.choices.values():
        # SUPPRESS: an absent flag after the command keeps the value given before it.
        _add_global_flags(command, default=argparse.SUPPRESS)
    return parser


def _run_oneshot(namespace: argparse.Namespace) -> int:
    values = _collect(namespace, ARGUMENT_CLASSES)
    parse_arguments(values, ARGUMENT_CLASSES)  # a bad value fails here, before transformers is imported
    from llmc.entrypoints.oneshot import oneshot

    result = oneshot(**values)
    for modifier, summary in result.report["summary"].items():
        logger.info(
            "%s: %d modules, mean weight error %.4f (worst %s)",
            modifier, summary["modules"], summary["mean_weight_error"] or 0.0, summary["worst_module"],
        )
    if result.output_dir is not None:
        print(f"saved {result.output_dir}")
    else:
        print("no --output-dir given: nothing was saved")
    return 0


def _run_train(namespace: argparse.Namespace) -> int:
    values = _collect(namespace, TRAIN_ARGUMENT_CLASSES)
    parse_arguments(values, TRAIN_ARGUMENT_CLASSES)  # as in _run_oneshot
    from llmc.entrypoints.train import train

    result = train(**values)
    report = result.report
    if report["train_steps"]:
        print(f"trained {report['train_steps']} steps: loss {report['first_loss']:.4f} -> {report['last_loss']:.4f}")
    print(f"saved {result.output_dir}" if result.output_dir else "no --output-dir given: nothing was saved")
    return 0


def _run_eval(namespace: argparse.Namespace) -> int:
    from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

    model, tokenizer = load_model_for_eval(
        namespace.model, precision=namespace.precision,
        trust_remote_code=namespace.trust_remote_code, device=namespace.device,
    )
    tokens = heldout_token_ids(tokenizer, namespace.dataset, text_column=namespace.text_column)
    value = perplexity(
        model, tokens, seq_len=namespace.max_seq_length, batch_size=namespace.batch_size,
        max_chunks=namespace.max_chunks,
    )
    print(f"perplexity {value:.3f}  ({namespace.model}, seq_len {namespace.max_seq_length})")
    return 0


def _run_plugins(_: argparse.Namespace) -> int:
    from llmc.plugins import load_registry

    registry = load_registry()
    for info in registry.describe():
        print(f"{info.name}  ({info.package} {info.version})")
        print(f"    modifiers: {', '.join(info.modifiers) or '-'}")
        if info.recipes:
            print(f"    recipes:   {', '.join('llmc:' + r for r in info.recipes)}")
        if info.experts_adapters:
            print(f"    experts:   {', '.join(info.experts_adapters)}")
    for name, reason in registry.failed.items():
        print(f"{name}  (failed to load: {reason})")
    return 0


def _run_recipes(_: argparse.Namespace) -> int:
    from llmc.plugins import load_registry

    registry = load_registry()
    for name, (plugin, path) in sorted(registry.recipes.items()):
        first_line = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"llmc:{name:<16} [{plugin}] {first_line}")
    return 0


def _run_demo(namespace: argparse.Namespace) -> int:
    from llmc.demo import run_demo

    run_demo(
        output_dir=namespace.output_dir,
        num_calibration_samples=namespace.num_calibration_samples,
        max_chunks=namespace.max_chunks,
    )
    return 0


COMMANDS = {
    "oneshot": _run_oneshot,
    "train": _run_train,
    "eval": _run_eval,
    "plugins": _run_plugins,
    "recipes": _run_recipes,
    "demo": _run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace, unknown = parser.parse_known_args(argv)
        if namespace.command is None:
            raise ArgumentError(
                f"no command given; choose one of {', '.join(COMMANDS)} (see: llmc --help)"
            )
        if unknown:
            subparser = parser._subparsers._group_actions[0].choices[namespace.command]  # type: ignore[union-attr]
            _refuse_unknown(unknown, subparser)
        logging.basicConfig(
            level=logging.WARNING if namespace.quiet else logging.INFO,
            format="llmc: %(message)s",
        )
        return COMMANDS[namespace.command](namespace)
    except LlmcError as error:
        print(f"llmc: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
