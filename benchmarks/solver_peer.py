"""Our GPTQ or SparseGPT solve against llm-compressor's on the same weights and Hessians.

    python benchmarks/solver_peer.py --model qwen-coder-0.5b --layers 0,12,23 --samples 16
    python benchmarks/solver_peer.py --method sparsegpt-50 --layers 0,12,23 --samples 64

A perplexity gap between the two tools' checkpoints can come from the solve (group scales,
act-order, mask selection, damping, the block updates) or from what fed it (the calibration
forwards, the propagated inputs, float summation order, compounded over the layers). This
separates the two: it captures the *dense* model's inputs of every Linear in ``--layers``
(float32, the first ``--samples`` calibration chunks of the benchmark's file), builds one
Hessian ``2/T Σ x xᵀ`` per module in float64 and hands the same float32 ``W`` and ``H`` to both
solvers, ours in this process and llm-compressor 0.14's in the peer's venv:

* ``gptq-w4a16``: ``llmc_gptq.gptq_quantize`` (act-order, group scales up front, our default)
  against ``quantize_weight`` (scales from compressed-tensors' ``calculate_qparams`` on the
  original weights, act-order ``static``), W4 symmetric groups of 128;
* ``sparsegpt-50`` / ``sparsegpt-2:4``: what ``SparseGPTModifier`` runs (dead columns, our
  one-Cholesky factor of the damped H⁻¹, ``sparsegpt_``) against ``sparsify_weight``.

Per module it prints the share of weights both treat alike (same grid point; same pruned
set), each one's error ``trace(ΔW H ΔWᵀ)`` relative to ``trace(W H Wᵀ)`` and their ratio,
beside round-to-nearest's (GPTQ) or magnitude pruning's (SparseGPT). Writes JSON lines to
``--json``. Run in llmc's venv; the peer's venv is ``benchlib.env.PEER_PYTHON``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_SOLVE = {"num_bits": 4, "group_size": 128, "block_size": 128, "dampening_frac": 0.01}
METHODS = {"gptq-w4a16": None, "sparsegpt-50": (0.5, 0, 0), "sparsegpt-2:4": (0.5, 2, 4)}


def peer_child(method: str, inputs: str, outputs: str) -> int:
    """In the peer's venv: llm-compressor's solve of ``method`` on every ``W``/``H`` pair."""
    if method != "gptq-w4a16":
        return peer_sparsegpt_child(method, inputs, outputs)
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from safetensors.torch import load_file, save_file

    tensors = load_file(inputs)
    args = QuantizationArgs(
        num_bits=_SOLVE["num_bits"], type="int", symmetric=True, strategy="group",
        group_size=_SOLVE["group_size"], actorder="static",
    )  # fmt: skip
    results = {}
    for key in sorted(k for k in tensors if k.endswith(".W")):
        name = key[: -len(".W")]
        W, H = tensors[key], tensors[f"{name}.H"]
        rows, cols = W.shape
        groups = W.reshape(rows, cols // args.group_size, args.group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        quantized, _losses, _fallback = quantize_weight(
            W[None].clone(), H[None].clone(), scale[None], zero_point[None], None, args,
            blocksize=_SOLVE["block_size"], percdamp=_SOLVE["dampening_frac"],
        )  # fmt: skip
        results[f"{name}.Q"] = quantized[0].contiguous()
        results[f"{name}.scale"] = scale.contiguous()
    save_file(results, outputs)
    return 0


def peer_sparsegpt_child(method: str, inputs: str, outputs: str) -> int:
    """``sparsify_weight`` of llm-compressor 0.14 (what its SparseGPTModifier calls per module)."""
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from safetensors.torch import load_file, save_file

    sparsity, pruned_n, group_m = METHODS[method]
    tensors = load_file(inputs)
    results = {}
    for key in sorted(k for k in tensors if k.endswith(".W")):
        name = key[: -len(".W")]
        W, H = tensors[key], tensors[f"{name}.H"]
        module = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        module.weight.data.copy_(W)
        _loss, pruned = sparsify_weight(
            module, {module: H.clone()}, sparsity, pruned_n, group_m, _SOLVE["block_size"],
            _SOLVE["dampening_frac"], False,
        )  # fmt: skip
        results[f"{name}.Q"] = pruned.contiguous()
    save_file(results, outputs)
    return 0


def ours_sparsegpt(method: str, W: Any, H: Any) -> Any:
    """What ``SparseGPTModifier`` does with one module's weight and Hessian."""
    from llmc_sparsity import sparsegpt_

    from llmc.hessian import inverse_cholesky_upper, zero_dead_columns_

    sparsity, pruned_n, group_m = METHODS[method]
    W, H = W.clone(), H.clone()
    zero_dead_columns_(H, W)
    U, _damping = inverse_cholesky_upper(H, _SOLVE["dampening_frac"], module_name="solver_peer")
    sparsegpt_(
        W, U, sparsity=sparsity, keep_n=group_m - pruned_n if group_m else 0, group_m=group_m,
        block_size=_SOLVE["block_size"],
    )  # fmt: skip
    return W


def magnitude(method: str, W: Any) -> Any:
    """The same share of the smallest weights set to 0 (per row of M for N:M), no update."""

    sparsity, pruned_n, group_m = METHODS[method]
    W = W.clone()
    if group_m:
        groups = W.reshape(W.shape[0], -1, group_m)
        smallest = groups.abs().topk(pruned_n, dim=-1, largest=False).indices
        groups.scatter_(-1, smallest, 0.0)
        return groups.reshape(W.shape)
    count = int(W.numel() * sparsity)
    W.view(-1)[W.abs().view(-1).argsort()[:count]] = 0.0
    return W


def capture_hessians(model: Any, chunks: Any, layers: list[int]) -> dict[str, Any]:
    """``2/T Σ x xᵀ`` (float64) of every Linear's inputs in ``layers``, on the dense model."""
    import torch

    hessians: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    handles = []

    class Stop(Exception):
        pass

    def add(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                tokens[name] = 0
            hessians[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]

        return hook

    def stop(*_):
        raise Stop

    for index in layers:
        for name, module in model.model.layers[index].named_modules():
            if isinstance(module, torch.nn.Linear):
                handles.append(
                    module.register_forward_pre_hook(add(f"model.layers.{index}.{name}"))
                )
    handles.append(model.model.layers[max(layers)].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for row in chunks:
                try:
                    model(input_ids=row[None], use_cache=False)
                except Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: (2.0 / tokens[name]) * H for name, H in hessians.items()}


def relative_error(W: Any, Q: Any, H: Any) -> float:
    delta = Q.double() - W.double()
    energy = float((W.double() @ H @ W.double().T).trace())
    return float((delta @ H @ delta.T).trace()) / energy


def main(argv: list[str]) -> int:
    if argv[:1] == ["--peer-child"]:
        return peer_child(argv[1], argv[2], argv[3])

    import torch
    from benchlib.child import load_chunks
    from benchlib.data import add_model_arguments, prepare
    from benchlib.env import PEER_PYTHON, int_list, parse, print_json_line, script_parser
    from llmc_gptq import gptq_quantize
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llmc.quantization import QuantizationArgs, compute_qparams, fake_quantize

    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.set_defaults(model="qwen-coder-0.5b", samples=16)
    parser.add_argument(
        "--layers", type=int_list, default=[0], help="comma-separated decoder layer indices"
    )
    parser.add_argument("--method", choices=sorted(METHODS), default="gptq-w4a16")
    parser.add_argument("--json", help="write one JSON line per module here")
    args = parse(parser, argv)
    layers = sorted(set(args.layers))

    model_dir, chunks_path = prepare(args.model, None, None)
    chunks = load_chunks(chunks_path)[: args.samples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    hessians = capture_hessians(model, chunks, layers)
    modules = dict(model.named_modules())
    tensors = {}
    for name, H in hessians.items():
        tensors[f"{name}.W"] = modules[name].weight.detach().float().contiguous()
        tensors[f"{name}.H"] = H.float().contiguous()

    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file(tensors, str(inputs))
        subprocess.run(
            [str(PEER_PYTHON), __file__, "--peer-child", args.method, str(inputs), str(outputs)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        peer = load_file(str(outputs))

    if args.method != "gptq-w4a16":
        return compare_sparsegpt(args, hessians, tensors, peer)
    rtn_args = QuantizationArgs(
        num_bits=_SOLVE["num_bits"], type="int", symmetric=True, strategy="group",
        group_size=_SOLVE["group_size"],
    )  # fmt: skip
    print(
        f"{'module':<34} {'same codes':>10} {'scale =':>7} {'ours':>10} {'peer':>10} {'ours/peer':>9} {'rtn':>10}"
    )
    for name in hessians:
        W, H = tensors[f"{name}.W"], tensors[f"{name}.H"]
        ours = gptq_quantize(
            W.clone(), H.clone(), num_bits=_SOLVE["num_bits"], symmetric=True, strategy="group",
            group_size=_SOLVE["group_size"], block_size=_SOLVE["block_size"],
            dampening_frac=_SOLVE["dampening_frac"], actorder=True, lazy_group_params=False,
        )  # fmt: skip
        scale, zero_point = compute_qparams(W, rtn_args)
        rtn = fake_quantize(W, scale, zero_point, rtn_args)
        H64 = hessians[name]
        peer_q = peer[f"{name}.Q"]
        row = {
            "module": name,
            "same_codes": float((ours.weight == peer_q).double().mean()),
            "scales_equal": bool(torch.equal(ours.scale.float(), peer[f"{name}.scale"].float())),
            "ours": relative_error(W, ours.weight, H64),
            "peer": relative_error(W, peer_q, H64),
            "rtn": relative_error(W, rtn, H64),
        }
        row["ratio"] = row["ours"] / row["peer"]
        print(
            f"{name:<34} {row['same_codes']:>10.4%} {str(row['scales_equal']):>7} {row['ours']:>10.3e} "
            f"{row['peer']:>10.3e} {row['ratio']:>9.4f} {row['rtn']:>10.3e}",
            flush=True,
        )
        if args.json:
            print_json_line(row, args.json)
    return 0


def compare_sparsegpt(args: Any, hessians: dict, tensors: dict, peer: dict) -> int:
    from benchlib.env import print_json_line

    print(
        f"{'module':<34} {'same mask':>9} {'pruned ours':>11} {'peer':>7} {'ours':>10} {'peer':>10} "
        f"{'ours/peer':>9} {'magnitude':>10}"
    )
    for name, H64 in hessians.items():
        W, H = tensors[f"{name}.W"], tensors[f"{name}.H"]
        ours = ours_sparsegpt(args.method, W, H)
        peer_w = peer[f"{name}.Q"]
        row = {
            "module": name,
            "method": args.method,
            "same_mask": float(((ours == 0) == (peer_w == 0)).double().mean()),
            "pruned_ours": float((ours == 0).double().mean()),
            "pruned_peer": float((peer_w == 0).double().mean()),
            "ours": relative_error(W, ours, H64),
            "peer": relative_error(W, peer_w, H64),
            "magnitude": relative_error(W, magnitude(args.method, W), H64),
        }
        row["ratio"] = row["ours"] / row["peer"]
        print(
            f"{name:<34} {row['same_mask']:>9.4%} {row['pruned_ours']:>11.5%} {row['pruned_peer']:>7.3%} "
            f"{row['ours']:>10.4e} {row['peer']:>10.4e} {row['ratio']:>9.5f} {row['magnitude']:>10.3e}",
            flush=True,
        )
        if args.json:
            print_json_line(row, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
