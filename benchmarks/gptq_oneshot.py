"""llmc's oneshot with GPTQ W4A16 g128, with the knobs ``ours_oneshot.py`` does not offer.

Run with llmc's venv::

    python benchmarks/gptq_oneshot.py --model DIR --chunks FILE --output DIR [--precision bfloat16]
        [--actorder static|null] [--true-sequential]
    python benchmarks/gptq_oneshot.py --model DIR --chunks FILE --floor [--precision bfloat16]

Same interface and output as ``ours_oneshot.py`` (last line: a JSON object with its own
timings). The recipe is the one both tools run, ``GPTQModifier: {targets: [Linear], scheme:
W4A16, ignore: [lm_head]}``, with llmc's defaults unless a flag changes one. ``--precision``
is the dtype the model is loaded and calibrated in (Hessians are float32 whatever it is).
``--floor`` compresses nothing: the calibration forwards alone (capture, one calibration and
one propagation pass per layer), in the same precision.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_started = time.perf_counter()


def recipe(actorder: str, true_sequential: bool) -> str:
    params = "targets: [Linear], scheme: W4A16, ignore: [lm_head]"
    params += f", actorder: {actorder}, true_sequential: {'true' if true_sequential else 'false'}"
    return f"quant_stage:\n  quant_modifiers:\n    GPTQModifier: {{{params}}}\n"


def run_floor(model_dir: str, chunks, precision: str, calibration_precision: str, batch_size: int) -> dict[str, object]:
    import torch

    from llmc import ModelArguments, RunContext, hookimpl
    from llmc.data import make_batches, padding_token_id
    from llmc.models import calibration_dtype, load_model, load_tokenizer
    from llmc.pipeline import LayerwisePipeline, make_lifecycle

    class CalibrationOnly:
        @hookimpl
        def llmc_layer_start(self, context, layer_name, layer):  # noqa: ARG002
            return True

    started = time.perf_counter()
    model_args = ModelArguments(model=model_dir, precision=precision, calibration_precision=calibration_precision)
    model = load_model(model_args)
    tokenizer = load_tokenizer(model_args, model)
    batches = make_batches(list(chunks), batch_size, padding_token_id(tokenizer))
    loaded = time.perf_counter()
    context = RunContext(model=model, device=next(model.parameters()).device, tokenizer=tokenizer,
                         compute_dtype=calibration_dtype(model_args, model))
    pipeline = LayerwisePipeline(model=model, context=context, lifecycle=make_lifecycle([CalibrationOnly()]))
    with torch.no_grad():
        pipeline.run(batches)
    finished = time.perf_counter()
    return {"load_s": round(loaded - started, 2), "pipeline_s": round(finished - loaded, 2), "oneshot_s": round(finished - started, 2)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--chunks", required=True, help="safetensors file with input_ids [n, seq_len]")
    parser.add_argument("--output", help="where the checkpoint goes (not with --floor)")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--precision", default="auto", help="model dtype for calibration (auto = checkpoint's)")
    parser.add_argument("--calibration-precision", default="auto", help="dtype the calibration forwards autocast to")
    parser.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: llmc's)")
    parser.add_argument("--actorder", default="static")
    parser.add_argument("--true-sequential", action="store_true")
    args = parser.parse_args(argv)
    if not args.floor and args.output is None:
        parser.error("--output is needed unless --floor")

    import torch
    from safetensors.torch import load_file

    chunks = load_file(args.chunks)["input_ids"].to(torch.long)  # [n, seq_len]
    n, seq_len = chunks.shape
    info: dict[str, object] = {
        "tool": "llmc",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "recipe": "floor" if args.floor else f"gptq-w4a16 actorder={args.actorder} true_sequential={args.true_sequential}",
        "precision": args.precision,
        "calibration_precision": args.calibration_precision,
        "samples": int(n),
        "seq_len": int(seq_len),
    }
    if args.floor:
        import llmc.models  # noqa: F401  (keep imports out of the timings)
        import llmc.pipeline  # noqa: F401

        imported = time.perf_counter()
        timings = run_floor(args.model, chunks, args.precision, args.calibration_precision, args.batch_size or 1)
    else:
        from datasets import Dataset

        from llmc import oneshot

        dataset = Dataset.from_dict({"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()})
        imported = time.perf_counter()
        result = oneshot(
            model=args.model, dataset=dataset, recipe=recipe(args.actorder, args.true_sequential),
            num_calibration_samples=int(n), max_seq_length=int(seq_len), output_dir=args.output,
            overwrite=True, precision=args.precision, calibration_precision=args.calibration_precision,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        finished = time.perf_counter()
        rows = result.report["modules"]
        timings = {
            "oneshot_s": round(finished - imported, 2),
            "solves_s": round(sum(row.get("seconds", 0.0) for row in rows), 2),
            "mean_output_error": sum(row.get("output_error") or 0.0 for row in rows) / max(len(rows), 1),
        }
    print(json.dumps({**info, "import_s": round(imported - _started, 2), **timings,
                      "total_s": round(time.perf_counter() - _started, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
