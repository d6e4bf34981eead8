"""Where two compressed checkpoints of one model part: output errors layer by layer, module by module.

    python benchmarks/layer_errors.py --model smollm2 \
        --checkpoint ours=/tmp/llmc-bench/runs/NAME/checkpoints/ours_sparsegpt-2_4-0 \
        --checkpoint peer=/tmp/llmc-bench/runs/NAME/checkpoints/peer_sparsegpt-2_4-0 --samples 16

Both tools calibrate each decoder layer on the outputs of the layers they already compressed,
so a perplexity gap can start anywhere: in one layer's solve (mask choice, damping, the
Hessian a module got) or in what the propagated inputs carried in. This runs the dense model
and every checkpoint side by side on the same calibration chunks (the first ``--samples`` of
the benchmark's file, float32) and prints per layer:

* ``local``: the relative output error ‖f̂(X) − f(X)‖ / ‖f(X)‖ of the compressed layer on the
  *dense* model's inputs X: that layer's own damage, the same inputs for every checkpoint;
* ``stream``: the same on the checkpoint's own inputs (the outputs of its compressed layers
  before), against the dense model's outputs: the error carried so far;
* per Linear, ``Σ‖x(Ŵ − W)ᵀ‖² / Σ‖xWᵀ‖²`` with x the module's inputs in the *dense* layer fed
  the checkpoint's own stream: exactly the objective each tool's solver minimised for that
  module (SparseGPT and GPTQ see the dense layer, not true-sequential), and with the dense
  stream, the same inputs for all; and the share of weights two checkpoints prune alike.

Writes every number to ``--json`` (JSON lines). Run in llmc's venv (transformers +
compressed-tensors read every tool's checkpoint).

A cheaper first look needs no forward at all: ``--losses OURS_CHECKPOINT PEER_LOG`` prints
SparseGPT's own loss ½ Σ (w − ŵ)²/U_ii² per module from both runs (our ``llmc_report.json``,
the peer's log lines), which agree to rounding while the two runs see the same inputs and drift
apart from the first module where they do not. llm-compressor divides its Hessian by the number
of *samples*, ours by the number of tokens, so its losses are ours × tokens per sample.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from benchlib.child import load_chunks
from benchlib.data import add_model_arguments, prepare
from benchlib.env import parse, print_json_line, script_parser


class _Stop(Exception):
    pass


def block_inputs(model: torch.nn.Module, chunks: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The first decoder layer's (args, kwargs) for every chunk, from forwards cut there."""
    captured: list[tuple[tuple, dict]] = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in chunks:
            try:
                model(input_ids=row[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: torch.nn.Module, hidden: list[torch.Tensor], rest: list[tuple[tuple, dict]]):
    outputs = []
    for h, (args, kwargs) in zip(hidden, rest):
        out = layer(h, *args[1:], **{k: v for k, v in kwargs.items() if k != "hidden_states"})
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / den) ** 0.5


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def module_objectives(
    dense_layer: torch.nn.Module,
    weights: dict[str, dict[str, torch.Tensor]],
    hidden: list[torch.Tensor],
    rest: list[tuple[tuple, dict]],
) -> dict[str, dict[str, float]]:
    """Per Linear and checkpoint: Σ‖x(Ŵ − W)ᵀ‖² / Σ‖xWᵀ‖², x the module's inputs in the dense layer."""
    sums: dict[str, dict[str, list[float]]] = {}
    handles = []
    for name, module in _linears(dense_layer).items():
        sums[name] = {tool: [0.0, 0.0] for tool in weights}

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])  # [tokens, cols]
            reference = float(torch.nn.functional.linear(x, mod.weight).double().pow(2).sum())
            for tool, by_module in weights.items():
                delta = by_module[name] - mod.weight
                sums[name][tool][0] += float(
                    torch.nn.functional.linear(x, delta).double().pow(2).sum()
                )
                sums[name][tool][1] += reference

        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_layer(dense_layer, hidden, rest)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: {tool: e / r for tool, (e, r) in by_tool.items()} for name, by_tool in sums.items()
    }


_PEER_MODULE = re.compile(r"Sparsifying (\S+?)\.? using")
_PEER_LOSS = re.compile(r"METRIC - error ([0-9.eE+-]+)")


def solver_losses(report: Path, peer_log: Path, tokens_per_sample: int) -> list[dict[str, Any]]:
    """Per module: our SparseGPT loss (scaled to the peer's Hessian), the peer's, their ratio."""
    ours = {
        row["module"]: row["obs_loss"] * tokens_per_sample
        for row in json.loads(report.read_text())["modules"]
        if row.get("obs_loss") is not None
    }
    peer: dict[str, float] = {}
    module = None
    for line in peer_log.read_text(errors="replace").splitlines():
        if found := _PEER_MODULE.search(line):
            module = found.group(1)
        elif (found := _PEER_LOSS.search(line)) and module is not None:
            peer[module], module = float(found.group(1)), None
    return [
        {"module": name, "ours": round(value, 3), "peer": round(peer[name], 3),
         "ratio": round(value / peer[name], 4) if peer[name] else None}
        for name, value in ours.items() if name in peer
    ]  # fmt: skip


@torch.no_grad()
def main(argv: list[str]) -> int:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", action="append", help="LABEL=DIR (repeat)")
    parser.add_argument(
        "--losses",
        nargs=2,
        metavar=("OURS_CHECKPOINT", "PEER_LOG"),
        help="only compare the two runs' per-module SparseGPT losses (no forwards)",
    )
    parser.add_argument("--layers", type=int, help="stop after this many layers")
    parser.add_argument("--json", help="append JSON lines here")
    args = parse(parser, argv)
    if args.losses:
        ours_dir, peer_log = (Path(p) for p in args.losses)
        seq_len = args.seq_len or load_chunks(prepare(args.model)[1]).shape[1]
        for row in solver_losses(ours_dir / "llmc_report.json", peer_log, seq_len):
            print_json_line(row, args.json)
        return 0
    if not args.checkpoint:
        parser.error("give --checkpoint LABEL=DIR (at least one) or --losses")
    from llmc.evaluate import load_model_for_eval

    model_dir, chunks_path = prepare(args.model)
    chunks = load_chunks(chunks_path)[: args.samples or 16]
    dense, _ = load_model_for_eval(str(model_dir), precision="float32", device="cpu")
    tools: dict[str, Any] = {}
    for spec in args.checkpoint:
        label, _, path = spec.partition("=")
        tools[label] = load_model_for_eval(path, precision="float32", device="cpu")[0]
    captured = block_inputs(dense, chunks)
    rest = [(args_, kwargs) for args_, kwargs in captured]
    first = [a[0] if a else k["hidden_states"] for a, k in captured]
    streams = {"dense": first, **{label: list(first) for label in tools}}
    layers = dense.model.layers[: args.layers] if args.layers else dense.model.layers
    labels = list(tools)
    for index, dense_layer in enumerate(layers):
        dense_out = _run_layer(dense_layer, streams["dense"], rest)
        record: dict[str, Any] = {"layer": index}
        weights = {}
        for label, model in tools.items():
            layer = model.model.layers[index]
            weights[label] = {n: m.weight for n, m in _linears(layer).items()}
            record[f"{label}_local"] = round(
                _relative(_run_layer(layer, streams["dense"], rest), dense_out), 6
            )
            own = _run_layer(layer, streams[label], rest)
            record[f"{label}_stream"] = round(_relative(own, dense_out), 6)
            streams[label + "_next"] = own
        modules = module_objectives(dense_layer, weights, streams["dense"], rest)
        own_objectives = {
            label: module_objectives(dense_layer, {label: weights[label]}, streams[label], rest)
            for label in labels
        }
        for name in modules:
            row: dict[str, Any] = {"layer": index, "module": name}
            for label in labels:
                row[f"{label}_dense_in"] = round(modules[name][label], 7)
                row[f"{label}_own_in"] = round(own_objectives[label][name][label], 7)
            if len(labels) >= 2:
                a, b = (weights[label][name] == 0 for label in labels[:2])
                row["same_zeros"] = round(float((a == b).float().mean()), 5)
            print_json_line(row, args.json)
        streams["dense"] = dense_out
        for label in labels:
            streams[label] = streams.pop(label + "_next")
        print_json_line(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
