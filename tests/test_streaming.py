"""Models larger than memory: a layer at a time from disk, written as it finishes, resumable.

The checkpoint of a streamed run (``offload='disk'``) must be byte-identical to the in-memory
run's, also when it was killed after a layer and run again; its memory must be bounded by a
layer, not by the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmc import ArgumentError, ModelLoadError, oneshot
from llmc.resume import work_dir_for
from llmc.save.safetensors_stream import entries_of_file, entry_of_tensor, write_safetensors
from llmc.testing import build_causal_lm, build_tokenizer, kill_when_paused

ON_LINUX = sys.platform.startswith("linux")


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for name in sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".json")):
        if name == "llmc_report.json":
            continue
        sha.update(name.encode())
        sha.update((directory / name).read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    """A 4-layer random Qwen2 (q/k/v biases) saved in several shards with an index."""
    path = tmp_path_factory.mktemp("sharded") / "model"
    build_causal_lm("qwen2", layers=4).save_pretrained(path, max_shard_size="300KB")
    build_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    return path


def _run(model, recipe, out: Path, offload: str, **extra):
    return oneshot(
        model=str(model), recipe=recipe, dataset="llmc:stdlib-docs", num_calibration_samples=8,
        max_seq_length=64, output_dir=str(out), offload=offload, **extra,
    )


RECIPES = {
    "rtn-w4a16": "llmc:w4a16",
    "gptq-w4a16": "llmc:gptq_w4a16",
    "sparsegpt-2of4": "llmc:sparsegpt_2of4",
}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES)
@pytest.mark.parametrize("which", ["embedded", "sharded"])
def test_streamed_checkpoint_is_byte_identical_to_the_in_memory_one(tmp_path, sharded_model, recipe, which):
    model = "llmc:tiny-llama" if which == "embedded" else sharded_model
    whole = _run(model, recipe, tmp_path / "whole", "none")
    streamed = _run(model, recipe, tmp_path / "streamed", "disk")
    assert whole.report["offload"] == "none" and streamed.report["offload"] == "disk"
    assert _digest(tmp_path / "whole") == _digest(tmp_path / "streamed")
    # the layers were released as they were written, and the work folder is gone
    layers = streamed.model.model.layers
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert not work_dir_for(tmp_path / "streamed").exists()
    assert [row["layer"] for row in streamed.report["layers"]] == [f"model.layers.{i}" for i in range(len(layers))]
    assert all(row["peak_rss_mb"] > 0 for row in streamed.report["layers"])


def test_host_offload_writes_the_same_checkpoint(tmp_path, sharded_model):
    whole = _run(sharded_model, "llmc:gptq_w4a16", tmp_path / "whole", "none")
    offloaded = _run(sharded_model, "llmc:gptq_w4a16", tmp_path / "cpu", "cpu")
    assert offloaded.report["offload"] == "cpu"
    assert _digest(tmp_path / "whole") == _digest(tmp_path / "cpu")
    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_time(whole.report["modules"]) == without_time(offloaded.report["modules"])


def test_stream_writer_equals_safetensors_save_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.10.w": torch.randn(3, 5, generator=generator).bfloat16(),
        "model.layers.9.w": torch.randint(-8, 8, (7,), dtype=torch.int8, generator=generator),
        "packed": torch.randint(0, 2**31 - 1, (4, 2), dtype=torch.int32, generator=generator),
        "scale": torch.randn(4, generator=generator).half(),
        "fp8": torch.randn(6, generator=generator).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.ones(3, dtype=torch.bool),
    }
    save_file(tensors, tmp_path / "library.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", [entry_of_tensor(k, v) for k, v in tensors.items()], {"format": "pt"})
    write_safetensors(tmp_path / "copied.safetensors", entries_of_file(tmp_path / "ours.safetensors"), {"format": "pt"})
    library = (tmp_path / "library.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == library
    assert (tmp_path / "copied.safetensors").read_bytes() == library


KILL_CLI = [sys.executable, "-m", "llmc", "oneshot", "--recipe", "llmc:gptq_w4a16", "--dataset",
            "llmc:stdlib-docs", "--num-calibration-samples", "8", "--max-seq-length", "64",
            "--offload", "disk"]


def _kill_after_layer(layer: int, model: Path, out: Path, log: Path) -> None:
    env = {**os.environ, "LLMC_TEST_PAUSE_AT": f"after-layer-{layer}"}
    kill_when_paused([*KILL_CLI, "--model", str(model), "--output-dir", str(out)], env, log)


@pytest.mark.skipif(not ON_LINUX, reason="waits on /proc/<pid>/stat")
def test_killed_streamed_run_resumes_to_the_identical_checkpoint(tmp_path, sharded_model, caplog):
    reference = _run(sharded_model, "llmc:gptq_w4a16", tmp_path / "reference", "disk")
    assert reference.report["resumed_layers"] == 0
    out = tmp_path / "out"
    _kill_after_layer(1, sharded_model, out, tmp_path / "run.log")
    journal = json.loads((work_dir_for(out) / "journal.json").read_text())
    assert journal["finished"] == ["model.layers.0", "model.layers.1"]
    assert not out.exists()  # a partial run never looks like a checkpoint

    with caplog.at_level(logging.WARNING, logger="llmc.resume"):
        resumed = _run(sharded_model, "llmc:gptq_w4a16", out, "disk")
    assert resumed.report["resumed_layers"] == 2
    assert "continuing at layer 2" in caplog.text
    assert _digest(out) == _digest(tmp_path / "reference")
    # the report still lists every module, the ones done before the kill included
    assert [r["module"] for r in resumed.report["modules"]] == [r["module"] for r in reference.report["modules"]]


@pytest.mark.skipif(not ON_LINUX, reason="waits on /proc/<pid>/stat")
def test_changed_recipe_or_no_resume_starts_over(tmp_path, sharded_model, caplog):
    out = tmp_path / "out"
    _kill_after_layer(0, sharded_model, out, tmp_path / "run.log")
    with caplog.at_level(logging.WARNING, logger="llmc.resume"):
        changed = _run(sharded_model, "llmc:w4a16", out, "disk")
    assert "recipe changed: starting over" in caplog.text
    assert changed.report["resumed_layers"] == 0

    out2 = tmp_path / "out2"
    _kill_after_layer(0, sharded_model, out2, tmp_path / "run2.log")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmc.resume"):
        fresh = _run(sharded_model, "llmc:gptq_w4a16", out2, "disk", resume=False)
    assert fresh.report["resumed_layers"] == 0 and "--no-resume" in caplog.text


def test_disk_offload_refuses_what_it_cannot_stream(tmp_path, sharded_model):
    with pytest.raises(ArgumentError, match=r"offload='disk' cannot be used here: each layer is written to output_dir"):
        oneshot(model=str(sharded_model), recipe="llmc:w4a16", offload="disk")
    model = build_causal_lm("llama")
    with pytest.raises(ArgumentError, match=r"must be a local folder"):
        oneshot(model=model, tokenizer=build_tokenizer(), recipe="llmc:w4a16", offload="disk",
                output_dir=str(tmp_path / "o"))
    with pytest.raises(ArgumentError, match=r"'offload' must be in .*'disk'.* \(got 'disc'\); did you mean 'disk'\?"):
        oneshot(model=str(sharded_model), recipe="llmc:w4a16", offload="disc")


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc/self/maps")
def test_layer_inputs_on_disk_are_mapped_files_and_change_nothing(tmp_path, sharded_model, caplog, monkeypatch):
    from llmc.offload import DiskStreaming

    mapped_files = []
    keep = DiskStreaming.keep

    def keep_and_look(self, batch):  # the real keep; then which files back this process's memory
        kept = keep(self, batch)
        mapped_files.append(sum("spill-rank0-" in line and "(deleted)" in line for line in open("/proc/self/maps")))
        return kept

    monkeypatch.setattr(DiskStreaming, "keep", keep_and_look)
    in_memory = _run(sharded_model, "llmc:gptq_w4a16", tmp_path / "memory", "disk")
    assert set(mapped_files) == {0}
    mapped_files.clear()
    with caplog.at_level(logging.INFO, logger="llmc.oneshot"):
        on_disk = _run(sharded_model, "llmc:gptq_w4a16", tmp_path / "mapped", "disk", layer_inputs="disk")
    assert _digest(tmp_path / "memory") == _digest(tmp_path / "mapped")
    assert [r["module"] for r in on_disk.report["modules"]] == [r["module"] for r in in_memory.report["modules"]]
    # every batch of inputs is a mapped, already unlinked file (8 batches: the first layer's
    # captured, then each next layer's while the current one's are still mapped, never more)
    assert mapped_files == list(range(1, 9)) + list(range(9, 17)) * 3
    assert "layer inputs: " in caplog.text and "(memory-mapped files)" in caplog.text
    assert not work_dir_for(tmp_path / "mapped").exists()
    with pytest.raises(ArgumentError, match=r"layer_inputs='disk' .* needs offload='disk' \(this run's offload is 'none'\)"):
        _run(sharded_model, "llmc:w4a16", tmp_path / "refused", "none", layer_inputs="disk")


def test_missing_shard_and_folder_without_safetensors(tmp_path, sharded_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in sharded_model.iterdir():
        (broken / item.name).symlink_to(item)
    first_shard = sorted(broken.glob("model-*.safetensors"))[0]
    first_shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"names shard {first_shard.name} but .* has no such file"):
        _run(broken, "llmc:w4a16", tmp_path / "o1", "disk")

    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").symlink_to(sharded_model / "config.json")
    with pytest.raises(ArgumentError, match=r"cannot read this model a layer at a time: .* holds no model.safetensors"):
        _run(bin_only, "llmc:w4a16", tmp_path / "o2", "disk")


PEAK_SCRIPT = """
import json, sys, tempfile, torch
from llmc import oneshot
from llmc.memory import MemoryPeak, current_rss_bytes
# warm up: every module a run imports, in this process, before the measurement starts
oneshot(model="llmc:tiny-llama", recipe="llmc:w4a16", output_dir=tempfile.mkdtemp(), overwrite=True)
peak = MemoryPeak(torch.device("cpu"))
peak.start()
before = current_rss_bytes()
oneshot(model=sys.argv[1], recipe="llmc:w4a16", output_dir=sys.argv[2], offload=sys.argv[3])
assert peak.resettable
print(json.dumps({"before": before, "peak": peak.stop()["peak_rss_mb"] * 2**20}))
"""


@pytest.mark.skipif(not ON_LINUX, reason="reads the peak from /proc/self/status")
def test_streamed_peak_memory_is_bounded_by_a_layer_not_the_model(tmp_path):
    """The same width at 3 and at 12 layers: a streamed run's peak (over the process's size before
    the run) grows by far less than the 9 extra layers (a few MB per layer of report rows,
    journal and allocator slack), where holding them would add all 9."""
    peaks = {}
    for layers in (3, 12):
        path = tmp_path / f"model-{layers}"
        model = build_causal_lm("llama", hidden=1024, layers=layers)
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        del model
        result = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / f"out-{layers}"), "disk"],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        peaks[layers] = measured["peak"] - measured["before"]
    assert peaks[12] - peaks[3] < 0.4 * 9 * layer_bytes, (peaks, layer_bytes)
