"""Arguments: one set of names for Python, config files and the CLI."""

from __future__ import annotations

from typing import Any, Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.args import (
    ARGUMENT_CLASSES,
    CONVERTER,
    DatasetArguments,
    ModelArguments,
    OutputArguments,
    RecipeArguments,
    parse_arguments,
)
from llmc.cli import build_parser
from llmc.errors import ArgumentError


def test_parse_arguments_sorts_names_into_classes():
    model, data, recipe, output = parse_arguments(
        {"model": "some/path", "num_calibration_samples": 8, "recipe": "llmc:w4a16", "output_dir": "out"}
    )
    assert model == ModelArguments(model="some/path")
    assert data.num_calibration_samples == 8 and data.max_seq_length == 384
    assert recipe == RecipeArguments(recipe="llmc:w4a16")
    assert output == OutputArguments(output_dir="out")
    assert model.trust_remote_code is False


def test_parse_arguments_unknown_name_suggests_closest():
    with pytest.raises(ArgumentError, match=r"unknown argument 'num_calibration_sample'; did you mean 'num_calibration_samples'\?"):
        parse_arguments({"num_calibration_sample": 8})


def test_parse_arguments_wrong_type_names_field_expected_and_got():
    with pytest.raises(ArgumentError, match=r"'num_calibration_samples'.*int") as caught:
        parse_arguments({"num_calibration_samples": "many"})
    assert "\n" not in str(caught.value)


def test_parse_arguments_bad_value_names_accepted_values():
    with pytest.raises(ArgumentError, match=r"'precision' must be in \('auto', 'float32', 'bfloat16', 'float16'\)"):
        parse_arguments({"precision": "fp8"})
    with pytest.raises(ArgumentError, match=r"'batch_size' must be a positive integer \(got 0\)"):
        parse_arguments({"batch_size": 0})


def test_parse_arguments_keeps_python_objects():
    import torch

    model = torch.nn.Linear(2, 2)
    parsed, *_ = parse_arguments({"model": model})
    assert parsed.model is model
    with pytest.raises(ArgumentError, match=r"'model' must be a local path, a hub name or a loaded model \(got int\)"):
        parse_arguments({"model": 3})


def test_cli_flags_cover_every_field():
    help_text = build_parser()._subparsers._group_actions[0].choices["oneshot"].format_help()
    for cls in ARGUMENT_CLASSES:
        for field in attrs.fields(cls):
            assert "--" + field.name.replace("_", "-") in help_text, field.name


@settings(max_examples=30, deadline=None)
@given(
    samples=st.integers(1, 4096),
    seq=st.integers(1, 8192),
    shuffle=st.booleans(),
    targets=st.none() | st.lists(st.sampled_from(["LlamaDecoderLayer", "re:.*layers\\.\\d+"]), max_size=2),
)
def test_dataset_arguments_structure_unstructure_round_trip(samples, seq, shuffle, targets):
    args = DatasetArguments(
        num_calibration_samples=samples, max_seq_length=seq,
        shuffle_calibration_samples=shuffle, sequential_targets=targets,
    )
    assert CONVERTER.structure(CONVERTER.unstructure(args), DatasetArguments) == args


def _actions(parser):
    return {action.dest: action for action in parser._actions if action.option_strings}


def test_cli_flag_types_follow_the_field_types():
    import argparse

    from llmc.args import TRAIN_ARGUMENT_CLASSES
    from llmc.cli import _add_argument_fields, _integer, _MergeMapping, _number, _parse_mapping

    parser = argparse.ArgumentParser()
    _add_argument_fields(parser, TRAIN_ARGUMENT_CLASSES)
    actions = _actions(parser)
    # (action class, type, nargs) per kind of field
    expected = {
        "num_calibration_samples": (argparse._StoreAction, _integer, None),  # int
        "max_steps": (argparse._StoreAction, _integer, None),                # int | None
        "learning_rate": (argparse._StoreAction, _number, None),             # float
        "trust_remote_code": (argparse.BooleanOptionalAction, None, 0),  # bool
        "sequential_targets": (argparse._StoreAction, None, "+"),        # list[str] | None
        "recipe_args": (_MergeMapping, _parse_mapping, None),            # dict[str, Any] | None
        "precision": (argparse._StoreAction, None, None),                # str
        "device": (argparse._StoreAction, None, None),                   # str | None
        "model": (argparse._StoreAction, None, None),                    # Any, cli_type str
    }
    for name, (action_class, kind, nargs) in expected.items():
        action = actions[name]
        assert (type(action), action.type, action.nargs) == (action_class, kind, nargs), name
        assert action.default is None, name
    assert actions["num_calibration_samples"].help.endswith("(default: 512)")
    assert actions["precision"].help.endswith("(default: auto)")


@attrs.frozen(kw_only=True)
class _Typed:
    """Fields of every kind a flag can be made from."""

    mode: Literal["fast", "exact"] = attrs.field(default="fast", metadata={"help": "how"})
    ratio: float | None = attrs.field(default=None, metadata={"help": "a ratio"})
    sizes: list[int] = attrs.field(factory=list, metadata={"help": "sizes"})
    names: tuple[str, ...] = attrs.field(default=(), metadata={"help": "names"})
    hook: Any = attrs.field(default=None, metadata={"help": "an object", "cli_type": "mapping"})
    hidden: set[int] = attrs.field(factory=set, metadata={"cli": False})


@attrs.frozen(kw_only=True)
class _Ambiguous:
    """A field whose command-line form cannot be told from its type."""

    value: int | str = 0


def test_cli_flag_types_derived_from_annotations():
    import argparse

    from llmc.cli import _add_argument_fields, _integer, _number, _parse_mapping

    parser = argparse.ArgumentParser()
    _add_argument_fields(parser, [_Typed])
    actions = _actions(parser)
    assert actions["mode"].choices == ("fast", "exact")
    assert actions["ratio"].type is _number
    assert (actions["sizes"].nargs, actions["sizes"].type) == ("+", _integer)
    assert (actions["names"].nargs, actions["names"].type) == ("+", None)
    assert actions["hook"].type is _parse_mapping
    assert "hidden" not in actions
    parsed = parser.parse_args(["--mode", "exact", "--ratio", "0.5", "--sizes", "1", "2", "--hook", "a=1"])
    assert (parsed.mode, parsed.ratio, parsed.sizes, parsed.hook) == ("exact", 0.5, [1, 2], {"a": 1})
    with pytest.raises(TypeError, match=r"cannot make a flag for _Ambiguous.value: it is typed int \| str"):
        _add_argument_fields(argparse.ArgumentParser(), [_Ambiguous])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param({"precision": "fp64"},
                     r"^'precision' must be in \('auto', 'float32', 'bfloat16', 'float16'\) \(got 'fp64'\)$",
                     id="precision-nothing-close"),
        pytest.param({"precision": "fp16"},
                     r"^'precision' must be in \(.*\) \(got 'fp16'\); did you mean 'float16'\?$",
                     id="precision-close"),
        pytest.param({"calibration_precision": "bf16"},
                     r"^'calibration_precision' must be in \(.*\) \(got 'bf16'\); did you mean 'bfloat16'\?$",
                     id="calibration-precision"),
        pytest.param({"lr_scheduler": "cos"},
                     r"^'lr_scheduler' must be in \('cosine', 'linear', 'constant'\) \(got 'cos'\); "
                     r"did you mean 'cosine'\?$",
                     id="lr-scheduler"),
        pytest.param({"model": ""},
                     r"^'model' is empty; pass a local directory, a hub name or llmc:tiny-llama$", id="empty-model"),
        pytest.param({"model": "  "}, r"^'model' is empty", id="blank-model"),
    ],
)
def test_parse_arguments_bad_value_is_one_line(values, expected):
    from llmc.args import TRAIN_ARGUMENT_CLASSES

    with pytest.raises(ArgumentError, match=expected):
        parse_arguments(values, TRAIN_ARGUMENT_CLASSES)


def test_argument_class_built_directly_refuses_bad_choice_in_one_line():
    # llmc.evaluate builds ModelArguments itself, without the converter.
    with pytest.raises(ArgumentError, match=r"^'precision' must be in \(.*\) \(got 'half'\)$") as caught:
        ModelArguments(precision="half")
    assert caught.value.name == "precision"


def test_oneshot_refuses_empty_model():
    from llmc import oneshot

    with pytest.raises(ArgumentError, match=r"^'model' is empty; pass a local directory"):
        oneshot(model="", recipe="llmc:w4a16")


@attrs.frozen(kw_only=True)
class _InValidated:
    """A field checked with attrs' own in_ validator, as a plugin may write it."""

    mode: str = attrs.field(default="fast", validator=attrs.validators.in_(("fast", "exact")))


def test_attrs_in_validator_message_is_one_line_with_closest():
    import cattrs

    from llmc.converters import make_converter, validation_problems

    with pytest.raises(cattrs.BaseValidationError) as caught:
        make_converter().structure({"mode": "fsat"}, _InValidated)
    [(_, message)] = validation_problems(caught.value, {"mode": "fsat"})
    assert message == "'mode' must be in ('fast', 'exact') (got 'fsat'); did you mean 'fast'?"


def test_parse_arguments_reports_every_unknown_name():
    expected = (
        r"^3 unknown arguments: 'modle' \(did you mean 'model'\?\), 'recipie' \(did you mean 'recipe'\?\), "
        r"'zzz'$"
    )
    with pytest.raises(ArgumentError, match=expected) as caught:
        parse_arguments({"modle": "x", "recipie": "llmc:w4a16", "zzz": 1, "seed": 1})
    assert caught.value.name == "modle"
