"""Shared pieces of the side-by-side benchmarks (run in llmc's venv).

* ``make_wide_llama``: a random-initialised Llama of a realistic width (hidden 2048), for time
  and memory only: its weights are random, so any perplexity measured on it means nothing.
* ``calibration_chunks``: calibration token ids both tools load from one file, so they
  calibrate on the very same tokens.
* ``heldout_perplexity``: llmc's held-out perplexity (the text was not used for calibration).
* ``measure``: runs a command as a separate process under ``/usr/bin/time -v`` and returns its
  wall time, peak RSS and exit code.

Also a small command line used by ``compare.py`` so that evaluation runs in its own process::

    python benchmarks/common.py ppl MODEL_DIR [--max-chunks N]
    python benchmarks/common.py wide-llama OUT_DIR
    python benchmarks/common.py chunks N SEQ_LEN OUT_FILE
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# No hub on these machines: fail at once instead of retrying for ~25 s.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402

BENCH_ROOT = Path(os.environ.get("LLMC_BENCH_ROOT", "/tmp/llmc-bench"))
REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "src" / "llmc" / "assets" / "tiny-llama"
CALIBRATION_PRESET = "llmc:stdlib-docs"
EVAL_SEQ_LEN = 512

WIDE_LLAMA_SPEC: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 0,
}
_SPEC_FILE = "bench_model_spec.json"

__all__ = [
    "BENCH_ROOT",
    "EMBEDDED_MODEL",
    "OFFLINE_ENV",
    "WIDE_LLAMA_SPEC",
    "calibration_chunks",
    "heldout_perplexity",
    "load_chunks",
    "make_wide_llama",
    "measure",
]


# --- models ---------------------------------------------------------------------------------


def make_wide_llama(path: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL) -> Path:
    """A random LlamaForCausalLM (hidden 2048, 4 layers, GQA 16/4 heads), fp32, seed 0.

    Saved with the embedded tokenizer so both tools load it by path. Built once: a folder that
    already holds a model of the same spec is reused. Random weights: only time and memory
    measured on it mean anything.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = {**WIDE_LLAMA_SPEC, "vocab_size": len(tokenizer)}
    spec_file = path / _SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return path
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _SPEC_FILE).write_text(json.dumps(spec, indent=1))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path


# --- calibration data -----------------------------------------------------------------------


def calibration_chunks(
    n: int,
    seq_len: int,
    path: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] = EMBEDDED_MODEL,
    seed: int = 0,
) -> torch.Tensor:
    """``n`` chunks of exactly ``seq_len`` token ids from the embedded calibration corpus.

    The documents of ``llmc:stdlib-docs`` are tokenized without special tokens, joined with eos
    into one stream, cut into non-overlapping chunks of ``seq_len``, and ``n`` of them are drawn
    with a seeded permutation. Saved as safetensors (``input_ids``, int64 ``[n, seq_len]``),
    which both tools' scripts read. Returns the tensor.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmc.data.presets import get_dataset_preset

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = [t for t in get_dataset_preset(CALIBRATION_PRESET)["text"] if isinstance(t, str) and t.strip()]
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index:
            stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    available = len(stream) // seq_len
    if available < n:
        raise ValueError(
            f"the corpus gives {available} chunks of {seq_len} tokens, fewer than the {n} asked for"
        )
    chunks = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    chunks = chunks[order].contiguous()  # [n, seq_len]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": chunks}, str(path), metadata={"source": CALIBRATION_PRESET, "seed": str(seed)})
    return chunks


def load_chunks(path: str | os.PathLike[str]) -> torch.Tensor:
    """The ``[n, seq_len]`` int64 token ids written by ``calibration_chunks``."""
    from safetensors.torch import load_file

    return load_file(str(path))["input_ids"]


# --- quality ----------------------------------------------------------------------------------


def heldout_perplexity(
    model_dir: str | os.PathLike[str], max_chunks: int | None = None, seq_len: int = EVAL_SEQ_LEN
) -> float:
    """Perplexity on llmc's held-out split (never used for calibration), fp32, chunks of 512.

    Compressed-tensors checkpoints load through transformers + compressed-tensors, the same
    reader for every tool's output.
    """
    from llmc.evaluate import heldout_token_ids, load_model_for_eval, perplexity

    model, tokenizer = load_model_for_eval(str(model_dir), precision="float32", device="cpu")
    ids = heldout_token_ids(tokenizer)
    return perplexity(model, ids, seq_len=seq_len, max_chunks=max_chunks)


# --- whole-process measurement ------------------------------------------------------------------

_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_USER = re.compile(r"User time \(seconds\): ([\d.]+)")
_SYS = re.compile(r"System time \(seconds\): ([\d.]+)")


def _clock_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot, all cores (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all cores busy over the next ``seconds`` (0 idle .. 1 all cores busy)."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    return (cpu_busy_seconds() - before) / (seconds * (os.cpu_count() or 1))


def wait_until_idle(max_wait_s: float = 120.0, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait_s``) until other processes leave the cores idle; the last share seen."""
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(4)
        busy = machine_busy_fraction()
    return round(busy, 3)


def _gnu_time() -> str:
    """GNU time's path, installing Debian's ``time`` package (as root) when it is missing."""
    time_bin = Path("/usr/bin/time")
    if not time_bin.is_file():
        if os.geteuid() != 0:
            raise RuntimeError("/usr/bin/time is missing: sudo apt-get update && sudo apt-get install -y time")
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "time"], check=True, stdout=subprocess.DEVNULL)
    return str(time_bin)


def measure(
    cmd: Sequence[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: ``{wall_s, peak_rss_mb, returncode, ...}``.

    ``peak_rss_mb`` is the largest resident set of the process (GNU time's "Maximum resident set
    size", in MiB). The command's stdout and stderr go to ``log_path`` (else are discarded); the
    time report goes to its own file so it never mixes with the command's output. After
    ``timeout_s`` the command's process group is killed and ``timed_out`` is set.
    ``others_cpu_s`` is the CPU time the rest of the machine used meanwhile: on a shared machine
    a large value marks a run slowed down by contention.
    """
    time_bin = _gnu_time()
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as report:
        report_path = report.name
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    busy_before = cpu_busy_seconds()
    timed_out = False
    try:
        process = subprocess.Popen(
            [time_bin, "-v", "-o", report_path, *map(str, cmd)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # its own process group, so a timeout ends all of it
        )
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    outer_wall = time.perf_counter() - started
    machine_cpu = cpu_busy_seconds() - busy_before
    text = Path(report_path).read_text(errors="replace")
    os.unlink(report_path)
    wall = _WALL.search(text)
    rss = _RSS.search(text)
    user = _USER.search(text)
    system = _SYS.search(text)
    status = re.search(r"Exit status: (-?\d+)", text)
    returncode = process.returncode
    if status is not None and returncode == 0:
        returncode = int(status.group(1))
    own_cpu = (float(user.group(1)) if user else 0.0) + (float(system.group(1)) if system else 0.0)
    return {
        "wall_s": round(_clock_seconds(wall.group(1)), 2) if wall else round(outer_wall, 2),
        "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "user_s": float(user.group(1)) if user else None,
        "sys_s": float(system.group(1)) if system else None,
        # CPU seconds that other processes took from the machine meanwhile: contention
        "others_cpu_s": round(max(machine_cpu - own_cpu, 0.0), 1),
        "returncode": returncode,
        "timed_out": timed_out,
        "cmd": [str(c) for c in cmd],
        "log": str(log_path) if log_path is not None else None,
    }


def last_json_line(log_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last line of a log that parses as a JSON object (the scripts' own timings)."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="held-out perplexity of a checkpoint (prints JSON)")
    ppl.add_argument("model_dir")
    ppl.add_argument("--max-chunks", type=int, default=None)
    wide = sub.add_parser("wide-llama", help="write the random wide Llama")
    wide.add_argument("out_dir")
    chunks = sub.add_parser("chunks", help="write calibration chunks")
    chunks.add_argument("n", type=int)
    chunks.add_argument("seq_len", type=int)
    chunks.add_argument("out_file")
    args = parser.parse_args(argv)
    if args.command == "ppl":
        started = time.perf_counter()
        value = heldout_perplexity(args.model_dir, args.max_chunks)
        print(json.dumps({"perplexity": value, "eval_s": round(time.perf_counter() - started, 2)}))
    elif args.command == "wide-llama":
        print(make_wide_llama(args.out_dir))
    else:
        print(tuple(calibration_chunks(args.n, args.seq_len, args.out_file).shape))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
