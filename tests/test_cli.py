"""The llmc command: bad input is one line on stderr and status 2."""

from __future__ import annotations

import pytest

from llmc.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_unknown_flag_suggests_closest(capsys):
    code, _, err = run(capsys, "oneshot", "--modle", "x", "--recipe", "llmc:w4a16")
    assert code == 2
    assert err.strip() == "llmc: error: unknown option '--modle'; did you mean '--model'?"


def test_cli_unknown_modifier_fails_before_model_load(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant_modifiers:\n  QuantizationModifer: {scheme: W4A16}\n")
    code, _, err = run(capsys, "oneshot", "--model", str(tmp_path / "missing"), "--recipe", str(recipe))
    assert code == 2
    assert "did you mean 'QuantizationModifier'?" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "oneshot", "--model", str(tmp_path / "missing"), "--recipe", "llmc:w4a16")
    assert code == 2
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_cli_config_file_and_flag_override(capsys, tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nrecipe: llmc:w4a16\noutput-dir: {tmp_path / 'out'}\n")
    code, out, err = run(capsys, "-q", "oneshot", "--config", str(config), "--recipe", "llmc:w8a16")
    assert code == 0, err
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "W8A16" in saved


def test_cli_config_file_unknown_key(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("modle: x\n")
    code, _, err = run(capsys, "oneshot", "--config", str(config))
    assert code == 2 and "unknown argument 'modle'; did you mean 'model'?" in err


def test_cli_plugins_and_recipes_list(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and "core  (llmc-core" in out and "QuantizationModifier" in out
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "llmc:w4a16" in out


@pytest.mark.parametrize("argv", [["oneshot", "--help"], ["eval", "--help"], ["--help"]])
def test_cli_help(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0


def test_cli_oneshot_then_eval_checkpoint(capsys, tmp_path, tiny_model_dir, text_file):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "w8a8"
    code, _, err = run(capsys, "-q", "oneshot", "--model", str(tiny_model_dir), "--recipe", "llmc:w8a8",
                       "--output-dir", str(out))
    assert code == 0, err
    code, out_text, err = run(capsys, "-q", "eval", "--model", str(out), "--dataset", str(text_file),
                              "--max-seq-length", "32")
    assert code == 0, err
    value = float(out_text.split()[1])
    assert 1.0 < value < 10_000
