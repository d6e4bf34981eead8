"""Every bad input to the llmc command is one line, ``llmc: error: <message>``, and status 2.

Cases where the command itself is the point (argparse's own errors, where global flags go) run
``python -m llmc.cli`` in a subprocess; the rest call ``main`` in-process, which is the same
code without the ~2-3 s of a fresh Python start.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmc.cli import build_parser, main

PRECISIONS = "'auto', 'float32', 'bfloat16', 'float16'"


def run_command(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmc.cli", *argv],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )


def assert_one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert "Traceback" not in err and "usage:" not in err, err
    assert err.splitlines() == [f"llmc: error: {expected}"], err
    assert code == 2 and out == ""


# --- argparse's own errors, through the real command ------------------------------------------

@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["oneshot", "--num-calibration-samples", "eight"],
                     "--num-calibration-samples expects an integer (got 'eight')", id="not-an-integer"),
        pytest.param(["train", "--learning-rate", "fast"],
                     "--learning-rate expects a number (got 'fast')", id="train-not-a-number"),
        pytest.param(["oneshot", "--recipe-args", "scheme"],
                     "--recipe-args expects KEY=VALUE pairs (got 'scheme')", id="recipe-args-without-equals"),
        pytest.param(["oneshot", "--model"], "--model expects a value (got no value)", id="missing-value"),
        pytest.param(["eval", "--model", "x", "--precision", "fp16"],
                     f"--precision must be one of {PRECISIONS} (got 'fp16'); did you mean 'float16'?",
                     id="invalid-choice"),
        pytest.param(["oneshoot"], "unknown command 'oneshoot'; did you mean 'oneshot'? (see: llmc --help)",
                     id="unknown-command"),
        pytest.param([], "no command given; choose one of oneshot, train, eval, plugins, recipes, demo "
                         "(see: llmc --help)", id="no-command"),
        pytest.param(["oneshot", "-q", "--num-calibration-samples", "eight"],
                     "--num-calibration-samples expects an integer (got 'eight')", id="quiet-after-command"),
    ],
)
def test_command_argument_error_is_one_line(argv, expected):
    result = run_command(*argv)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, expected)


def test_command_quiet_flag_after_the_command_is_accepted():
    result = run_command("recipes", "-q")
    assert result.returncode == 0, result.stderr
    assert "llmc:w4a16" in result.stdout and result.stderr == ""


def test_command_help_still_prints_help():
    result = run_command("oneshot", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: llmc oneshot")


def test_command_argument_error_fails_before_transformers_is_imported():
    code = (
        "import sys\n"
        "from llmc.cli import main\n"
        "assert main(['oneshot', '--num-calibration-samples', 'eight']) == 2\n"
        "print(sorted(m for m in ('transformers', 'datasets') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the same errors in-process ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param("oneshot --num-calibration-samples 1.5",
                     "--num-calibration-samples expects an integer (got '1.5')", id="float-for-integer"),
        pytest.param("oneshot --max-seq-length", "--max-seq-length expects an integer (got no value)",
                     id="integer-missing"),
        pytest.param("oneshot --sequential-targets",
                     "--sequential-targets expects one or more values (got no value)", id="list-missing"),
        pytest.param("oneshot --recipe-args =W8A16", "--recipe-args expects KEY=VALUE pairs (got '=W8A16')",
                     id="recipe-args-without-key"),
        pytest.param("oneshot --recipe-args scheme=[", "--recipe-args expects KEY=VALUE pairs (got 'scheme=[')",
                     id="recipe-args-bad-yaml"),
        pytest.param("oneshot --recipe-args [1,2]", "--recipe-args expects KEY=VALUE pairs (got '[1,2]')",
                     id="recipe-args-not-a-mapping"),
        pytest.param("oneshot --recipe-args", "--recipe-args expects KEY=VALUE pairs (got no value)",
                     id="recipe-args-missing"),
        pytest.param("train --max-steps ten", "--max-steps expects an integer (got 'ten')", id="train-integer"),
        pytest.param("train --weight-decay none", "--weight-decay expects a number (got 'none')",
                     id="train-number"),
        pytest.param("eval --model x --max-chunks many", "--max-chunks expects an integer (got 'many')",
                     id="eval-integer"),
        pytest.param("eval --model x --precision fp64", f"--precision must be one of {PRECISIONS} (got 'fp64')",
                     id="eval-choice-nothing-close"),
        pytest.param("demo --num-calibration-samples x", "--num-calibration-samples expects an integer (got 'x')",
                     id="demo-integer"),
        pytest.param("oneshot --overwrite=yes",
                     "--overwrite takes no value (got 'yes'); use --overwrite or --no-overwrite",
                     id="bool-with-value"),
        pytest.param("eval", "the following arguments are required: --model", id="required-flag"),
        pytest.param("-q", "no command given; choose one of oneshot, train, eval, plugins, recipes, demo "
                           "(see: llmc --help)", id="only-global-flags"),
        pytest.param("-x oneshot", "unknown option '-x'; did you mean '-q'?", id="unknown-global-flag"),
        # Choices come from the field's OneOf validator, so the flag refuses them at parse time.
        pytest.param("oneshot --precision fp16",
                     f"--precision must be one of {PRECISIONS} (got 'fp16'); did you mean 'float16'?",
                     id="oneshot-precision"),
        pytest.param("train --lr-scheduler cos",
                     "--lr-scheduler must be one of 'cosine', 'linear', 'constant' (got 'cos'); "
                     "did you mean 'cosine'?", id="train-lr-scheduler"),
        # Values the flags accept but the argument classes refuse, before transformers is imported.
        pytest.param(["oneshot", "--model", ""],
                     "'model' is empty; pass a local directory, a hub name or llmc:tiny-llama", id="empty-model"),
        pytest.param("oneshot --model x --num-calibration-samples 0",
                     "'num_calibration_samples' must be a positive integer (got 0)", id="not-positive"),
    ],
)
def test_cli_argument_error_is_one_line(capsys, argv, expected):
    code = main(argv.split() if isinstance(argv, str) else argv)
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, expected)


@pytest.mark.parametrize(
    ("argv", "quiet"),
    [
        pytest.param(["recipes"], False, id="absent"),
        pytest.param(["-q", "recipes"], True, id="before"),
        pytest.param(["recipes", "-q"], True, id="after"),
        pytest.param(["oneshot", "--model", "x", "--quiet"], True, id="after-long"),
        pytest.param(["-q", "train", "--quiet"], True, id="both"),
    ],
)
def test_cli_global_flags_before_or_after_the_command(argv, quiet):
    namespace, unknown = build_parser().parse_known_args(argv)
    assert (namespace.quiet, unknown) == (quiet, [])


# --- unknown names: all of them at once -------------------------------------------------------

def test_cli_config_file_reports_every_unknown_key(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("modle: x\nrecipie: llmc:w4a16\nnum-calibration-sample: 8\nseed: 1\n")
    code = main(["oneshot", "--config", str(config)])
    captured = capsys.readouterr()
    expected = (
        f"config file {str(config)!r}: 3 unknown arguments: 'modle' (did you mean 'model'?), "
        "'recipie' (did you mean 'recipe'?), 'num_calibration_sample' (did you mean 'num_calibration_samples'?)"
    )
    assert_one_line_error(code, captured.out, captured.err, expected)


def test_cli_reports_every_unknown_option(capsys):
    code = main(["oneshot", "--modle", "x", "--recipie=y", "--seed", "-1"])
    captured = capsys.readouterr()
    expected = "2 unknown options: '--modle' (did you mean '--model'?), '--recipie' (did you mean '--recipe'?)"
    assert_one_line_error(code, captured.out, captured.err, expected)
