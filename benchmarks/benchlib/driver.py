"""The A B A B driver: configurations run as separate processes, interleaved.

Every comparison script (``compare.py``, ``gptq_compare.py``, ``sparsity_quality.py``,
``sparsity_solve.py``) is this driver with its own list of configurations. A round runs each
configuration once, in the order given (A B C, A B C, ...), so slow drift of the machine hits
every configuration alike; before each run the driver waits until other processes leave the
cores idle, and every run records how much CPU others took anyway.

A configuration whose plugin is missing (exit status ``EXIT_PLUGIN_MISSING``) or that ran past
the timeout is not run again; a peer configuration is dropped, with a note, when the peer's
venv is missing, so a comparison without llm-compressor reports only our numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib.child import EXIT_PLUGIN_MISSING, last_json_line
from benchlib.data import MODELS, add_model_arguments, prepare
from benchlib.env import (
    BENCH_DIR,
    BENCH_ROOT,
    PEER_PYTHON,
    REPO_ROOT,
    RESULTS_DIR,
    int_list,
    load_average,
)
from benchlib.measure import measure, wait_until_idle

__all__ = [
    "Config",
    "add_arguments",
    "compare",
    "evaluate_checkpoint",
    "interleave",
    "ours",
    "peer",
]

OURS_SCRIPT = BENCH_DIR / "ours_oneshot.py"
PEER_SCRIPT = BENCH_DIR / "peer_oneshot.py"
PERPLEXITY_SCRIPT = BENCH_DIR / "perplexity.py"


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: its label and command, and how many rounds it takes part in.

    When ``writes_checkpoint``, the driver appends ``--output DIR`` (a fresh folder per run),
    and evaluates the checkpoint when asked. ``is_peer`` and ``is_floor`` mark the references
    the summary divides the others by.
    """

    label: str
    command: tuple[str, ...]
    rounds: int
    writes_checkpoint: bool = False
    is_peer: bool = False
    is_floor: bool = False


def _child(
    python: str, script: Path, model_dir: Path, chunks: Path, args: Sequence[str]
) -> tuple[str, ...]:
    return (python, str(script), "--model", str(model_dir), "--chunks", str(chunks), *args)


def ours(label: str, model_dir: Path, chunks: Path, *args: str, rounds: int) -> Config:
    """``ours_oneshot.py`` on the model and chunks with ``args`` (``--recipe NAME`` or ``--floor``, ...)."""
    floor = "--floor" in args
    command = _child(sys.executable, OURS_SCRIPT, model_dir, chunks, args)
    return Config(label, command, rounds, writes_checkpoint=not floor, is_floor=floor)


def peer(label: str, model_dir: Path, chunks: Path, recipe: str, *args: str, rounds: int) -> Config:
    """``peer_oneshot.py`` in the peer's venv on the model and chunks, recipe ``recipe``, with
    ``args`` (``--precision float32``, ...)."""
    command = _child(str(PEER_PYTHON), PEER_SCRIPT, model_dir, chunks, ("--recipe", recipe, *args))
    return Config(label, command, rounds, writes_checkpoint=True, is_peer=True)


def evaluate_checkpoint(
    model_dir: Path, log: Path, max_chunks: int | None = None
) -> tuple[float | None, dict[str, Any]]:
    """Held-out perplexity, in its own process (transformers + compressed-tensors, llmc's venv),
    and the evaluation's facts: its wall time, peak RSS, and the checkpoint's weight sparsity.

    ``max_chunks``: only the first chunks of 512 held-out tokens (the same ones for every
    checkpoint), where evaluating a larger model on all of them costs more than its run.
    """
    command = [sys.executable, str(PERPLEXITY_SCRIPT), str(model_dir)]
    if max_chunks:
        command += ["--max-chunks", str(max_chunks)]
    result = measure(command, log_path=log)
    printed = last_json_line(log) or {}
    facts = {k: result[k] for k in ("wall_s", "peak_rss_mb", "returncode")}
    facts.update({k: printed[k] for k in ("zero_share", "two_four_share") if k in printed})
    return printed.get("perplexity"), facts


def _slug(label: str) -> str:
    return label.replace(":", "_").replace("@", "_").replace("+", "_").replace("/", "_")


def one_run(
    config: Config,
    round_: int,
    *,
    work: Path,
    idle_wait_s: float,
    timeout_s: float | None,
    order_seed: int | None = None,
) -> dict[str, Any]:
    """One run of ``config`` once the machine is quiet, logged to ``work/logs``, calibrating
    on the chunks in ``order_seed``'s order (None or 0: the file's)."""
    slug = f"{_slug(config.label)}-{round_}"
    log = work / "logs" / f"{slug}.log"
    command = list(config.command)
    if order_seed:
        command += ["--order-seed", str(order_seed)]
    output = work / "checkpoints" / slug
    if config.writes_checkpoint:
        if output.exists():
            shutil.rmtree(output)
        command += ["--output", str(output)]
    busy = wait_until_idle(idle_wait_s)
    load = load_average()
    started = time.strftime("%H:%M:%S")
    print(
        f"[{started}] {config.label} #{round_} (machine busy {busy}, load {load}) ...", flush=True
    )
    run = measure(command, log_path=log, timeout_s=timeout_s, cwd=work)
    run.update(
        label=config.label, round=round_, started=started, busy_before=busy, loadavg_before=load,
        order_seed=order_seed or None,
    )  # fmt: skip
    run["loadavg_after"] = load_average()
    run["internal"] = last_json_line(log)
    if config.writes_checkpoint:
        run["output"] = str(output)
    if run["timed_out"]:
        print(f"    timed out after {timeout_s / 60:.0f} min; see {log}", flush=True)
    elif run["returncode"] == EXIT_PLUGIN_MISSING:
        run["skipped"] = (run["internal"] or {}).get("message", "plugin missing")
        print(f"    skipped: {run['skipped']}", flush=True)
    elif run["returncode"] != 0:
        print(f"    FAILED (exit {run['returncode']}); see {log}", flush=True)
    else:
        print(
            f"    {run['wall_s']:.1f} s, {run['peak_rss_mb']:.0f} MB "
            f"(others used {run['others_cpu_s']} CPU s meanwhile)",
            flush=True,
        )
    return run


def interleave(
    configs: Sequence[Config],
    *,
    work: Path,
    idle_wait_s: float,
    timeout_s: float | None = None,
    evaluate_rounds: int = 0,
    after_each: Callable[[list[dict[str, Any]]], None] | None = None,
    max_eval_chunks: int | None = None,
    order_seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Run the configurations round by round; one record per run (``measure``'s, and more).

    Round r calibrates on the chunks in ``order_seeds[r]``'s order (0, or no seeds: the
    file's). Checkpoints of the first ``evaluate_rounds`` rounds are evaluated (held-out perplexity).
    ``after_each`` gets the runs so far after every run, so that a comparison stopped part-way
    still leaves its numbers.
    """
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    dropped: set[str] = set()
    for round_ in range(max((c.rounds for c in configs), default=0)):
        for config in configs:
            if round_ >= config.rounds or config.label in dropped:
                continue
            run = one_run(
                config, round_, work=work, idle_wait_s=idle_wait_s, timeout_s=timeout_s,
                order_seed=order_seeds[round_] if order_seeds else None,
            )  # fmt: skip
            if run.get("skipped") or run["timed_out"]:
                dropped.add(config.label)
            ok = run["returncode"] == 0 and not run["timed_out"]
            if ok and config.writes_checkpoint and round_ < evaluate_rounds:
                ppl_log = work / "logs" / f"{_slug(config.label)}-{round_}.ppl.log"
                run["perplexity"], run["eval"] = evaluate_checkpoint(
                    Path(run["output"]), ppl_log, max_eval_chunks
                )
                print(f"    perplexity {run['perplexity']}", flush=True)
            runs.append(run)
            if after_each is not None:
                after_each(runs)
    return runs


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    repeats: int = 3,
    timeout_min: float = 25.0,
    idle_wait: float = 120.0,
) -> None:
    """The options every model comparison takes: model, rounds, data size, waits, evaluation, name."""
    add_model_arguments(parser)
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="rounds (runs of each configuration)"
    )
    parser.add_argument(
        "--timeout-min", type=float, default=timeout_min, help="stop a run after this long"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=idle_wait,
        help="before each run, wait up to this many seconds for other processes to leave the cores idle (0: never)",
    )
    parser.add_argument(
        "--perplexity",
        action=argparse.BooleanOptionalAction,
        help="evaluate checkpoints on the held-out text (default: embedded model only; the wide one is random)",
    )
    parser.add_argument(
        "--perplexity-rounds",
        type=int,
        default=1,
        help="evaluate the checkpoints of the first N rounds (default: the first round only)",
    )
    parser.add_argument(
        "--max-eval-chunks",
        type=int,
        help="evaluate on the first N held-out chunks of 512 tokens only (default: all)",
    )
    parser.add_argument(
        "--order-rounds",
        action="store_true",
        help="round r > 0 calibrates every tool on the same chunks in seed r's order (round 0: "
        "the file's), so the medians are over orders; use with --perplexity-rounds",
    )
    parser.add_argument(
        "--order-seeds",
        type=int_list,
        help="comma-separated: round r calibrates every tool in seed r's order (0: the file's); "
        "sets the number of rounds, e.g. 1,2 to add two orders to an earlier file-order run",
    )
    parser.add_argument(
        "--baseline",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="evaluate the uncompressed model too (--no-baseline: a second invocation beside "
        "one that does)",
    )
    parser.add_argument(
        "--name", help="results name: results/<name>.json (default: from the configurations)"
    )


def order_seeds(args: argparse.Namespace) -> list[int] | None:
    """Each round's calibration order from ``--order-seeds`` or ``--order-rounds`` (None: the
    file's for every round)."""
    if args.order_seeds:
        return args.order_seeds
    return list(range(args.repeats)) if args.order_rounds else None


def compare(
    args: argparse.Namespace,
    make_configs: Callable[[Path, Path], list[Config]],
    *,
    default_name: str,
) -> int:
    """Prepare the model and chunks once, run ``make_configs(model_dir, chunks_file)`` interleaved.

    Writes ``results/<name>.json`` after every run and prints the table at the end. Exit status
    1 when a run failed (a skipped one is not a failure).
    """
    from benchlib.results import (
        calibration_facts,
        model_facts,
        our_versions,
        peer_versions,
        print_table,
        write_results,
    )

    model_dir, chunks_file = prepare(args.model, args.samples, args.seq_len)
    seeds = order_seeds(args)
    if args.order_seeds:
        args.repeats = len(seeds)
    configs = make_configs(model_dir, chunks_file)
    versions_peer = peer_versions() if any(c.is_peer for c in configs) else None
    if versions_peer is None and any(c.is_peer for c in configs):
        print(
            f"peer not available ({PEER_PYTHON} missing or broken): reporting only our numbers",
            flush=True,
        )
        configs = [c for c in configs if not c.is_peer]
    if not configs:
        print("nothing to run", file=sys.stderr)
        return 2
    peer_label = next((c.label for c in configs if c.is_peer), None)
    floor_label = next((c.label for c in configs if c.is_floor), None)
    name = args.name or default_name
    work = BENCH_ROOT / "runs" / name
    evaluate = MODELS[args.model]["perplexity"] if args.perplexity is None else args.perplexity
    baseline_ppl = None
    if evaluate and args.baseline:
        baseline_ppl, _ = evaluate_checkpoint(
            model_dir, work / "logs" / "uncompressed.ppl.log", args.max_eval_chunks
        )
        print(f"uncompressed model: perplexity {baseline_ppl}", flush=True)
    facts = {
        "model": {"kind": args.model, **model_facts(model_dir)},
        "calibration": calibration_facts(chunks_file),
        "versions": {"ours": our_versions(), "peer": versions_peer},
        "configs": [
            {"label": c.label, "command": list(c.command), "rounds": c.rounds} for c in configs
        ],
        "baseline_perplexity": baseline_ppl,
        "max_eval_chunks": args.max_eval_chunks,
    }
    results: dict[str, Any] = {}

    def save(runs: list[dict[str, Any]]) -> None:
        results.update(write_results(name, runs, peer=peer_label, floor=floor_label, **facts))

    runs = interleave(
        configs,
        work=work,
        idle_wait_s=args.idle_wait,
        timeout_s=args.timeout_min * 60,
        evaluate_rounds=args.perplexity_rounds if evaluate else 0,
        after_each=save,
        max_eval_chunks=args.max_eval_chunks,
        order_seeds=seeds,
    )
    if not runs:
        return 0
    model, calibration = facts["model"], facts["calibration"]
    print(
        f"\n{name}: {args.model} model ({model['hidden_size']} hidden, {model['num_hidden_layers']} layers), "
        f"{calibration['samples']} x {calibration['seq_len']} calibration tokens, "
        f"{results['machine']['cores']} cores; medians"
    )
    print_table(
        results["summary"],
        over_peer=results["ratios_over_peer"],
        over_floor=results["ratios_over_floor"],
        baseline_ppl=baseline_ppl,
    )
    print(f"\nresults: {(RESULTS_DIR / f'{name}.json').relative_to(REPO_ROOT)}")
    return 0 if all(r["returncode"] == 0 or r.get("skipped") for r in runs) else 1
