"""torchrun runs: two gloo ranks on CPU against one process (llmc.distributed)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmc.distributed as distributed
from llmc.distributed import RowSplit, owners, plan_solves, row_bounds, shard_bounds, solve_groups
from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity
from llmc.resume import work_dir_for
from llmc.testing import GPTQ_W4_GROUP16, wait_until_paused

ON_LINUX = sys.platform.startswith("linux")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


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


def _llama_layer_costs(hidden=4096, intermediate=14336, kv=1024):
    """(cost, prepare cost) of the q/k/v, o, gate/up and down groups (``group_cost``'s terms)."""
    shapes = [([hidden, kv, kv], hidden), ([hidden], hidden), ([intermediate, intermediate], hidden), ([hidden], intermediate)]
    costs = [cols**3 + sum(rows) * cols**2 for rows, cols in shapes]
    return costs, [cols**3 for _, cols in shapes]


def _finish_times(plan, costs, prepare_costs, ranks):
    """When each rank finishes under ``plan`` (preparations, whole groups, then its rows)."""
    load = [0.0] * ranks
    for index in plan.shares:
        load[plan.owner[index]] += prepare_costs[index]
    ready = list(load)
    for index, cost in enumerate(costs):
        if index not in plan.shares:
            load[plan.owner[index]] += cost
    for index, shares in plan.shares.items():
        for r, (start, stop) in enumerate(shares):
            if stop > start:
                load[r] = max(load[r], ready[plan.owner[index]]) + (stop - start) * (costs[index] - prepare_costs[index])
    return load


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_a_group_above_a_fair_share_is_prepared_once_and_its_rows_shared(ranks):
    costs, prepare_costs = _llama_layer_costs()
    plan = plan_solves(costs, ranks, prepare_costs=prepare_costs, splittable=[True] * 4)
    assert list(plan.shares) == [3]  # only down, whose cost is most of the layer
    shares = plan.shares[3]
    assert shares[0][0] == 0.0 and shares[-1][1] == 1.0
    assert all(shares[r][1] == shares[r + 1][0] for r in range(ranks - 1))  # contiguous, in rank order
    finish = _finish_times(plan, costs, prepare_costs, ranks)
    # the preparation cannot be shared: no plan finishes before it and the rows' fair share
    floor = prepare_costs[3] + (costs[3] - prepare_costs[3]) / ranks
    assert max(finish) <= floor * 1.0001
    whole = max(_finish_times(plan_solves(costs, ranks), costs, prepare_costs, ranks))
    assert max(finish) < 0.9 * whole
    assert plan_solves(costs, ranks, prepare_costs=prepare_costs, splittable=[True] * 4) == plan  # every rank agrees


def test_nothing_is_split_for_one_rank_or_a_group_that_cannot_be():
    costs, prepare_costs = _llama_layer_costs()
    assert plan_solves(costs, 1, prepare_costs=prepare_costs, splittable=[True] * 4).shares == {}
    plan = plan_solves(costs, 2, prepare_costs=prepare_costs, splittable=[True, True, True, False])
    assert plan.shares == {} and plan.owner == owners(costs, 2)
    balanced = [10.0, 10.0, 10.0, 10.0]  # no group above a fair share
    assert plan_solves(balanced, 2, prepare_costs=[1.0] * 4, splittable=[True] * 4).shares == {}


@pytest.mark.parametrize("rows,step", [(1, 1), (7, 1), (4096, 1), (4096, 128), (1000, 64)])
def test_row_shares_cover_every_row_exactly_once(rows, step):
    generator = torch.Generator().manual_seed(rows)
    for _ in range(20):
        cuts = sorted(torch.rand(3, generator=generator).tolist())
        fractions = [0.0, *cuts, 1.0]
        covered = []
        for start, stop in zip(fractions, fractions[1:]):
            first, last = row_bounds(rows, start, stop, step)
            assert first % step == 0 or first == rows
            covered.extend(range(first, last))
        assert covered == list(range(rows))


def _rows_example(log):
    """Three groups of one 'modifier': the second is the large one; its result is a row-wise
    function of its matrix and its preparation (the largest entry)."""
    generator = torch.Generator().manual_seed(0)
    matrices = {"a": torch.randn(8, 8, generator=generator), "big": torch.randn(64, 32, generator=generator),
                "b": torch.randn(4, 8, generator=generator)}

    def prepare(group):
        log.append(("prepare", group))
        return {"peak": matrices[group].abs().max()}

    def rows(group, prepared, start, stop):
        first, last = row_bounds(matrices[group].shape[0], start, stop)
        log.append(("rows", group, first, last))
        return torch.cumsum(matrices[group][first:last], 1) / prepared["peak"]

    def compute(group):
        log.append(("compute", group))
        return torch.cumsum(matrices[group], 1) / matrices[group].abs().max()

    split = RowSplit(prepare=prepare, compute_rows=rows, join=lambda group, _, parts: torch.cat(parts),
                     can_split=lambda group: True)
    applied = {}
    solve_groups(["a", "big", "b"], [10.0, 100.0, 5.0], compute, applied.__setitem__, torch.device("cpu"), "test",
                 split=split, prepare_costs=[2.0, 50.0, 1.0])
    return applied


def _rows_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        log = []
        applied = _rows_example(log)
        torch.save({"applied": applied, "log": log}, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_share_the_rows_of_a_large_group_and_apply_what_one_process_does(tmp_path):
    alone = _rows_example([])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rows_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for outcome in ranks:
        assert list(outcome["applied"]) == ["a", "big", "b"]  # in the groups' order
        for group, result in alone.items():
            assert torch.equal(outcome["applied"][group], result), group
    logs = [outcome["log"] for outcome in ranks]
    assert ("prepare", "big") in logs[0] and ("prepare", "big") not in logs[1]
    pieces = sorted(entry[2:] for log in logs for entry in log if entry[0] == "rows")
    assert len(pieces) == 2 and pieces[0][0] == 0 and pieces[0][1] == pieces[1][0] and pieces[1][1] == 64
    assert sorted(entry[1] for log in logs for entry in log if entry[0] == "compute") == ["a", "b"]


def _cli(recipe, output, *extra, model="llmc:tiny-llama"):
    return [
        "-m", "llmc", "oneshot", "--model", model, "--recipe", recipe,
        "--dataset", "llmc:stdlib-docs", "--num-calibration-samples", "16",
        "--max-seq-length", "128", "-q", "--output-dir", str(output), *extra,
    ]


def _oneshot(tmp_path, name, recipe, ranks, *extra, model="llmc:tiny-llama"):
    output = tmp_path / name
    arguments = _cli(recipe, output, *extra, model=model)
    if ranks > 1:
        arguments = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *arguments]
    done = subprocess.run([sys.executable, *arguments], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return output


RECIPES = ("llmc:w4a16", "llmc:gptq_w4a16", "llmc:sparsegpt_2of4", "llmc:awq_w4a16_asym", "llmc:smoothquant_w8a8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed")
    return {
        (recipe, ranks): _oneshot(tmp_path, f"{recipe.replace(':', '-')}-{ranks}", recipe, ranks)
        for recipe in RECIPES
        for ranks in (1, 2)
    }


def _rows(output):
    report = json.loads((output / "llmc_report.json").read_text())
    return report, {row["module"]: row for row in report["modules"]}


@pytest.mark.parametrize("recipe", ["llmc:w4a16", "llmc:smoothquant_w8a8"])
def test_two_ranks_write_the_same_rtn_checkpoint_once(runs, recipe):
    """RTN alone, and after SmoothQuant (whose max |x| per channel is the same max over ranks)."""
    one, two = runs[(recipe, 1)], runs[(recipe, 2)]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[key] == b[key]).all() for key in a)
    assert not any(path.name.startswith(".") for path in two.parent.iterdir() if two.name in path.name)


@pytest.mark.parametrize("recipe", ["llmc:gptq_w4a16", "llmc:sparsegpt_2of4"])
def test_two_ranks_see_every_token_and_match_one_process(runs, recipe):
    one, two = runs[(recipe, 1)], runs[(recipe, 2)]
    _, rows_one = _rows(one)
    report_two, rows_two = _rows(two)
    assert report_two["ranks"] == 2 and report_two["calibration_samples"] == 16
    assert rows_one.keys() == rows_two.keys()
    error = "output_error" if recipe == "llmc:gptq_w4a16" else "obs_loss"
    for name, row in rows_one.items():
        # the Hessians hold the same tokens; they differ by the order of fp32 sums only
        assert rows_two[name].get("tokens") == row.get("tokens"), name
        assert rows_two[name][error] == pytest.approx(row[error], rel=0.05), name
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    if recipe == "llmc:sparsegpt_2of4":
        # Layer 0 sees the same inputs in both runs: its Hessians differ by the order of fp32 sums
        # only, so its masks agree but for near-tied pairs, which sum order (so the CPU's kernels)
        # decides; a pair chosen the other way changes the compensation of the rest of its row,
        # so weights are compared on the rows whose masks agree. From layer 1 on the inputs carry
        # those differences and masks diverge further (7-14 % of weights on an AVX2 CPU, under 2 %
        # on an AVX-512 one), with losses still within 5 % (above): there both stay 2:4.
        for key in (key for key in a if a[key].dim() == 2 and "layers" in key):
            for weights in (a[key], b[key]):
                assert bool(((weights == 0).reshape(-1, 4).sum(dim=1) >= 2).all()), key
            if key.startswith("model.layers.0."):
                differs = (a[key] == 0) != (b[key] == 0)
                same = ~differs.any(dim=1)
                assert differs.float().mean() < 1e-3 and same.float().mean() > 0.9, key
                assert (a[key][same] - b[key][same]).norm() < 1e-3 * a[key][same].norm(), key


def test_two_ranks_awq_searches_every_token_and_chooses_as_one_process(runs):
    def searches(ranks):
        report, _ = _rows(runs[("llmc:awq_w4a16_asym", ranks)])
        return {row["module"]: row for row in report["modules"] if row["modifier"] == "AWQModifier"}

    searched_one, searched_two = searches(1), searches(2)
    assert searched_one.keys() == searched_two.keys() and len(searched_one) >= 2 * 4
    for name, row in searched_one.items():
        other = searched_two[name]
        assert other["tokens"] == row["tokens"] and other["search_tokens"] == row["search_tokens"], name
        # the same grid point, unless two were within the fp32 rounding of the ranks' sums
        assert other["alpha"] == row["alpha"] or other["output_error"] == pytest.approx(row["output_error"], rel=1e-3), name
        assert other["output_error"] == pytest.approx(row["output_error"], rel=0.05), name


def _perplexity(path, token_ids):
    model, _ = load_model_for_eval(str(path))
    return perplexity(model, token_ids, seq_len=128, max_chunks=8)


@pytest.mark.parametrize("recipe", ["llmc:gptq_w4a16", "llmc:sparsegpt_2of4"])
def test_two_ranks_give_the_perplexity_of_one_process(runs, recipe):
    one, two = runs[(recipe, 1)], runs[(recipe, 2)]
    _, tokenizer = load_model_for_eval(str(one))
    token_ids = heldout_token_ids(tokenizer)
    # 2:4 masks diverge from layer 1 on where a near-tied pair in layer 0 flips (see above):
    # 1.2 % apart in perplexity on an AVX2 CPU; GPTQ's rounding stays within 0.5 %
    tolerance = 0.02 if recipe == "llmc:sparsegpt_2of4" else 0.005
    assert _perplexity(two, token_ids) == pytest.approx(_perplexity(one, token_ids), rel=tolerance)


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        sha.update(path.name.encode() + path.read_bytes())
    sha.update((directory / "config.json").read_bytes())
    return sha.hexdigest()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_ranks(arguments, log_dir: Path, paused_rank: int, pause_at: str) -> list[subprocess.Popen]:
    """Two ranks started as torchrun starts them (its environment), one of them to pause."""
    port, processes = _free_port(), []
    for rank in range(2):
        env = {
            **ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LLMC_DISTRIBUTED_TIMEOUT": "120",
        }
        if rank == paused_rank:
            env["LLMC_TEST_PAUSE_AT"] = pause_at
        log = (log_dir / f"rank{rank}.log").open("wb")
        processes.append(subprocess.Popen([sys.executable, *arguments], env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


@pytest.mark.skipif(not ON_LINUX, reason="waits on /proc/<pid>/stat")
def test_a_killed_rank_stops_the_run_and_the_relaunch_resumes(runs, tmp_path):
    """Rank 1 is killed after layer 1 of a streamed run: rank 0 stops with one line instead of
    hanging, and the relaunched run continues at layer 2 to the uninterrupted run's checkpoint."""
    recipe = "llmc:gptq_w4a16"
    streamed = _oneshot(tmp_path, "streamed", recipe, 2, "--offload", "disk")
    # streaming changes nothing: the same checkpoint as the in-memory 2-rank run
    assert _digest(streamed) == _digest(runs[(recipe, 2)])
    assert not work_dir_for(streamed).exists()

    output = tmp_path / "killed"
    rank0, rank1 = _start_ranks(_cli(recipe, output, "--offload", "disk"), tmp_path, 1, "after-layer-1")
    wait_until_paused(rank1, tmp_path / "rank1.log")
    rank1.send_signal(signal.SIGKILL)
    rank1.wait()
    stopped = time.monotonic()
    assert rank0.wait(timeout=150) != 0
    log = (tmp_path / "rank0.log").read_text()
    assert time.monotonic() - stopped < 130
    assert "llmc: error: rank 0 of 2:" in log and "Traceback" not in log, log[-2000:]
    journal = json.loads((work_dir_for(output) / "journal.json").read_text())
    assert journal["finished"] == ["model.layers.0", "model.layers.1"]
    assert sorted(p.name for p in work_dir_for(output).glob("inputs-*")) == [
        "inputs-00002-rank0.pt", "inputs-00002-rank1.pt"
    ]
    assert not output.exists()

    resumed = _oneshot(tmp_path, "killed", recipe, 2, "--offload", "disk")
    report, _ = _rows(resumed)
    assert report["resumed_layers"] == 2 and report["ranks"] == 2
    assert _digest(resumed) == _digest(streamed)
    assert not work_dir_for(resumed).exists()


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
        output = _oneshot(tmp_path, f"moe-{ranks}", str(recipe), ranks, "--no-moe-calibrate-all-experts", model=str(model))
        reports[ranks] = {row["module"]: row for row in json.loads((output / "llmc_report.json").read_text())["modules"]}
    assert reports[1].keys() == reports[2].keys()
    experts = [name for name in reports[1] if ".experts." in name]
    assert len(experts) == 2 * 8 * 3
    for name in experts:
        one, two = reports[1][name], reports[2][name]
        assert "method" not in two and two["tokens"] == one["tokens"] > 0, name
        assert two["output_error"] == pytest.approx(one["output_error"], rel=0.05), name
