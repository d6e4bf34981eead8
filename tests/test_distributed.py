"""torchrun runs: two gloo ranks on CPU against one process (llmc.distributed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import llmc.distributed as distributed
from llmc.distributed import owners, shard_bounds, solve_groups


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 8])
def test_shares_cover_every_sample_exactly_once_in_order(ranks):
    for count in range(0, 40):
        covered = []
        for rank in range(ranks):
            start, stop = shard_bounds(count, rank, ranks)
            covered.extend(range(start, stop))
            assert stop - start in (count // ranks, count // ranks + 1)
        assert covered == list(range(count))


def test_solves_go_to_the_least_loaded_rank_largest_first():
    costs = [841.0, 481.0, 103.0, 69.0]  # down, gate/up, q/k/v, o of a Llama-3-8B layer
    plan = owners(costs, 2)
    assert plan == [0, 1, 1, 1]
    assert owners(costs, 1) == [0, 0, 0, 0]
    assert owners(costs, 2) == plan  # the same plan on every rank


def test_groups_of_one_key_are_computed_in_one_batch_and_applied_in_order(monkeypatch):
    """Keys "gate" and "down" alternate as an MoE block's experts do; None is solved alone."""
    groups = ["attn", "gate0", "down0", "gate1", "down1", "gate2", "down2", "router"]
    keys = {"attn": None, "router": None}
    costs = [4.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0, 1.0]
    calls: list[list[str]] = []
    applied: list[tuple[str, str]] = []

    def compute(group):
        calls.append([group])
        return f"solved {group}"

    def compute_batch(batch):
        calls.append(list(batch))
        return [f"solved {group}" for group in batch]

    def run():
        calls.clear()
        applied.clear()
        solve_groups(
            groups, costs, compute, lambda group, result: applied.append((group, result)), torch.device("cpu"),
            "test", batch_key=lambda group: keys.get(group, group.rstrip("0123456789")),
            compute_batch=compute_batch,
        )

    run()
    assert calls == [["attn"], ["gate0", "gate1", "gate2"], ["down0", "down1", "down2"], ["router"]]
    assert applied == [(group, f"solved {group}") for group in groups]
    monkeypatch.setattr(distributed, "BATCH_COST", 5.0)  # two gate solves fit, not three; one down solve
    run()
    assert calls == [["attn"], ["gate0", "gate1"], ["down0"], ["down1"], ["gate2"], ["down2"], ["router"]]
    assert applied == [(group, f"solved {group}") for group in groups]
    with pytest.raises(ValueError, match="batch_key and compute_batch together"):
        solve_groups(groups, costs, compute, lambda *_: None, torch.device("cpu"), "test", batch_key=len)


def _oneshot(tmp_path, name, recipe, ranks, model="llmc:tiny-llama", extra=()):
    output = tmp_path / name
    arguments = [
        "-m", "llmc", "oneshot", "--model", model, "--recipe", recipe,
        "--dataset", "llmc:stdlib-docs", "--num-calibration-samples", "16",
        "--max-seq-length", "128", "-q", "--output-dir", str(output), *extra,
    ]
    if ranks > 1:
        arguments = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *arguments], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed")
    return {
        (recipe, ranks): _oneshot(tmp_path, f"{recipe.replace(':', '-')}-{ranks}", recipe, ranks)
        for recipe in ("llmc:w4a16", "llmc:gptq_w4a16")
        for ranks in (1, 2)
    }


def test_two_ranks_write_the_same_rtn_checkpoint_once(runs):
    one, two = runs[("llmc:w4a16", 1)], runs[("llmc:w4a16", 2)]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[key] == b[key]).all() for key in a)
    assert not any(path.name.startswith(".") for path in two.parent.iterdir() if two.name in path.name)


def test_two_ranks_gptq_sees_every_token_and_matches_one_process(runs):
    one, two = runs[("llmc:gptq_w4a16", 1)], runs[("llmc:gptq_w4a16", 2)]
    report_one = json.loads((one / "llmc_report.json").read_text())
    report_two = json.loads((two / "llmc_report.json").read_text())
    assert report_two["ranks"] == 2 and report_two["calibration_samples"] == 16
    rows_one = {row["module"]: row for row in report_one["modules"]}
    rows_two = {row["module"]: row for row in report_two["modules"]}
    assert rows_one.keys() == rows_two.keys()
    for name, row in rows_one.items():
        # the Hessians hold the same tokens; they differ by the order of fp32 sums only
        assert rows_two[name]["tokens"] == row["tokens"], name
        assert rows_two[name]["output_error"] == pytest.approx(row["output_error"], rel=0.05), name
    assert (two / "model.safetensors").is_file()


GPTQ_W4_GROUP16 = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""


def test_two_ranks_solve_their_experts_in_batches_and_match_one_process(tmp_path, tokenizer):
    """Routed calibration of a tiny Qwen3-MoE: each rank batches the experts ``owners`` gives
    it, the results go to every rank; every expert is GPTQ-solved from the same tokens as in one
    process (a result applied to the wrong group would show as a rounded module or a far error)."""
    from llmc.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "moe", tokenizer, kind="qwen3_moe")
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ_W4_GROUP16)
    reports = {}
    for ranks in (1, 2):
        output = _oneshot(
            tmp_path, f"moe-{ranks}", str(recipe), ranks, model=str(model), extra=["--no-moe-calibrate-all-experts"]
        )
        reports[ranks] = {row["module"]: row for row in json.loads((output / "llmc_report.json").read_text())["modules"]}
    assert reports[1].keys() == reports[2].keys()
    experts = [name for name in reports[1] if ".experts." in name]
    assert len(experts) == 2 * 8 * 3
    for name in experts:
        one, two = reports[1][name], reports[2][name]
        assert "method" not in two and two["tokens"] == one["tokens"] > 0, name
        assert two["output_error"] == pytest.approx(one["output_error"], rel=0.05), name
