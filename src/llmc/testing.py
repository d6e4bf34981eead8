"""Helpers for plugin authors' tests: a tiny random model, a tokenizer and seeded data.

Core's tests and both bundled plugins' tests build their models here, so a plugin's tests run
against the same kind of model core is tested with, and none of them needs a network or a
download: the tokenizer is trained on a few sentences and the weights are seeded random.

Nothing here depends on pytest; wrap the builders in fixtures of your own::

    @pytest.fixture(scope="session")
    def model_dir(tmp_path_factory):
        return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GPTQ_W4_GROUP16",
    "MOE_KINDS",
    "SAMPLE_TEXT",
    "build_causal_lm",
    "build_moe_lm",
    "solving_rows_in_parts",
    "build_tokenizer",
    "compress_moe_logging_batches",
    "correlated_inputs",
    "kill_when_paused",
    "never_route_to",
    "sample_logits",
    "save_tiny_gguf",
    "save_tiny_model",
    "wait_until_paused",
    "write_text_file",
]

SAMPLE_TEXT = [
    "Return the number of items in a container.",
    "Open the file and return a stream; raise OSError upon failure.",
    "Split the string at the first occurrence of the separator.",
    "Create a new dictionary with keys from the iterable and values set to value.",
    "Return a copy of the string with leading and trailing whitespace removed.",
    "Compute the greatest common divisor of the integers given as arguments.",
    "Encode the string using the codec registered for encoding.",
    "Return True if the object is an instance of the class or of a subclass thereof.",
] * 4


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on ``SAMPLE_TEXT``, so no test downloads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )


def build_causal_lm(
    kind: str = "llama", *, hidden: int = 128, layers: int = 2, vocab: int = 320, seed: int = 0
):
    """A seeded random decoder ("llama", "mistral", "qwen2", "qwen3"), small enough for a unit test.

    The default widths are multiples of 128, so group-wise quantization and N:M masks apply to
    every Linear; pass another ``hidden`` to test a width they do not divide.
    """
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    config = configs[kind](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# GPTQ with groups of 16: small enough for the tiny test models' widths
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

MOE_KINDS = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3")


def build_moe_lm(
    kind: str = "qwen3_moe",
    *,
    hidden: int = 64,
    experts: int = 8,
    expert_width: int = 32,
    top_k: int = 2,
    layers: int = 2,
    vocab: int = 320,
    seed: int = 0,
):
    """A seeded random mixture-of-experts decoder (one of ``MOE_KINDS``) with fused experts.

    As transformers 5 builds them: ``experts`` experts of width ``expert_width``, ``top_k`` per
    token, in every layer (DeepSeek-V3: after a first dense layer, with one shared expert, as
    Qwen2-MoE has its own). The default widths (64, 32) fit group size 16 or 32, not 128.
    """
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=top_k,
        bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden,
            moe_intermediate_size=expert_width, num_experts=experts,
        )
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common, num_key_value_heads=2, intermediate_size=2 * hidden,
            moe_intermediate_size=expert_width, shared_expert_intermediate_size=2 * expert_width,
            num_experts=experts,
        )
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            **common, num_key_value_heads=2, intermediate_size=expert_width, num_local_experts=experts,
        )
    elif kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common, num_key_value_heads=4, intermediate_size=2 * hidden,
            moe_intermediate_size=expert_width, n_routed_experts=experts, n_shared_experts=1,
            n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=hidden // 2,
            kv_lora_rank=hidden // 2, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        )
    else:
        raise ValueError(f"kind must be one of {', '.join(MOE_KINDS)} (got {kind!r})")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def never_route_to(model, expert: int) -> list:
    """Make the routers of a ``build_moe_lm`` model never choose ``expert``: a forward hook on
    each ``mlp.gate`` gives that top-k slot to the lowest-numbered expert the token has not
    chosen (routing weights unchanged). Returns the hook handles, to ``remove()`` them.
    """

    def reroute(module, args, output):
        logits, weights, index = output
        index = index.clone()
        for row in index:  # [top_k] experts of one token
            if bool((row == expert).any()):
                free = next(e for e in range(logits.shape[-1]) if e != expert and not bool((row == e).any()))
                row[row == expert] = free
        return logits, weights, index

    return [
        module.register_forward_hook(reroute)
        for name, module in model.named_modules()
        if name.endswith("mlp.gate")
    ]


def compress_moe_logging_batches(tokenizer, dataset, recipe: str, all_experts: bool) -> tuple[dict, dict, list[str]]:
    """``oneshot`` of a tiny Qwen3-MoE whose expert 7 is never routed to, on 4 samples of
    ``dataset``: its state dict, its report rows by module (without their ``seconds``) and the
    batches of solves ``llmc.distributed`` logged ("groups [...] in one batch")."""
    import logging

    from llmc import oneshot

    model = build_moe_lm("qwen3_moe")
    never_route_to(model, 7)
    batches: list[str] = []

    class Batches(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "in one batch" in record.getMessage():
                batches.append(record.getMessage())

    log, handler = logging.getLogger("llmc.distributed"), Batches(logging.DEBUG)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        result = oneshot(
            model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset, num_calibration_samples=4,
            moe_calibrate_all_experts=all_experts,
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    rows = {row["module"]: {k: v for k, v in row.items() if k != "seconds"} for row in result.report["modules"]}
    return result.model.state_dict(), rows, batches


def save_tiny_model(path: str | Path, tokenizer=None, kind: str = "llama") -> Path:
    """Save a ``build_causal_lm`` model (``build_moe_lm`` for a kind in ``MOE_KINDS``) and its
    tokenizer to ``path``, loadable like a checkpoint.

    Tests that pass a model by path exercise the loading code a user's run goes through.
    """
    path = Path(path)
    (build_moe_lm(kind) if kind in MOE_KINDS else build_causal_lm(kind)).save_pretrained(path)
    (tokenizer if tokenizer is not None else build_tokenizer()).save_pretrained(path)
    return path


def save_tiny_gguf(model_dir: str | Path, path: str | Path) -> Path:
    """Write the Llama checkpoint in ``model_dir`` (float32, byte-level BPE tokenizer) as the
    GGUF file llama.cpp's converter would, with float32 tensors, so loading a ``.gguf`` model is
    tested without downloading one. Needs the ``gguf`` package.

    The format's facts: llama.cpp's tensor names; q/k rows interleaved per head (transformers
    undoes it on load); a "gpt2" tokenizer as its token list, types and merges.
    """
    import gguf
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    specials = {token["id"] for token in tokenizer["added_tokens"] if token["special"]}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([
        gguf.TokenType.CONTROL if vocab[token] in specials else gguf.TokenType.NORMAL for token in tokens
    ])
    writer.add_token_merges([
        " ".join(merge) if isinstance(merge, list) else merge for merge in tokenizer["model"]["merges"]
    ])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        if config.get(f"{key}_token_id") is not None:
            add(config[f"{key}_token_id"])

    def interleaved(weight: torch.Tensor, groups: int) -> torch.Tensor:
        rows = weight.shape[0]
        return weight.reshape(groups, 2, rows // groups // 2, -1).transpose(1, 2).reshape(weight.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for index in range(config["num_hidden_layers"]):
        for part, short in parts.items():
            names[f"model.layers.{index}.{part}.weight"] = f"blk.{index}.{short}.weight"
    for name, weight in weights.items():
        if name.endswith("q_proj.weight"):
            weight = interleaved(weight, heads)
        elif name.endswith("k_proj.weight"):
            weight = interleaved(weight, kv_heads)
        writer.add_tensor(names[name], weight.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_text_file(path: str | Path, lines: list[str] = SAMPLE_TEXT) -> Path:
    """Write ``lines`` as a jsonl file of ``{"text": ...}`` rows: a local calibration dataset."""
    path = Path(path)
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def sample_logits(model, tokenizer) -> torch.Tensor:
    """The logits of two fixed sentences, to compare a model before and after a save or load."""
    batch = tokenizer(
        ["Return the number of items.", "Split the string at the separator."],
        return_tensors="pt", padding=True,
    )
    with torch.no_grad():
        return model(**batch).logits


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``X: [tokens, cols]`` with correlated columns of unequal scale, like a layer's inputs.

    Independent unit-variance columns give a near-identity Hessian, where every calibrated
    method reduces to round-to-nearest; these inputs make the difference measurable.
    """
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5
    scales = torch.rand(cols, generator=generator) * 2 + 0.1
    mixed = torch.randn(tokens, cols, generator=generator) @ mixing
    return (mixed + 0.3 * torch.randn(tokens, cols, generator=generator)) * scales


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


def kill_when_paused(
    command: Sequence[str], env: Mapping[str, str], log: Path, *, timeout_s: float = 300
) -> int:
    """Run ``command`` until it stops itself (a fault point, ``llmc.save.atomic.pause_point``),
    SIGKILL it there and return its pid; raise ``AssertionError`` (with its log) if it exits
    before. Linux only (reads ``/proc/<pid>/stat``)."""
    with log.open("wb") as output:
        process = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, env=dict(env))
        wait_until_paused(process, log, timeout_s=timeout_s)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process.pid


def wait_until_paused(process: subprocess.Popen, log: Path, *, timeout_s: float = 300) -> None:
    """Return once ``process`` stopped itself at a fault point; raise ``AssertionError`` (with
    its log) if it exits or runs past ``timeout_s`` first. Linux only."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and _process_state(process.pid) != "T":
        if time.monotonic() > deadline:
            process.kill()
            break
        time.sleep(0.05)
    if process.poll() is not None:
        raise AssertionError(f"the run exited ({process.returncode}) before pausing: {log.read_text()}")


def solving_rows_in_parts(run_class: type, cuts: Sequence[float] = (0.37, 0.37)) -> tuple[Any, list[list[str]]]:
    """A ``_compute_group`` for ``run_class`` (a modifier's run state whose ``_solver`` offers a
    ``llmc.distributed.RowSplit``) that solves every group it can split as ranks sharing its
    rows would, in one process: prepared once, its rows in parts between ``cuts`` (an empty
    part included), joined; other groups whole. Returns it and the list of the groups split.

    Patched in (``monkeypatch.setattr(run_class, "_compute_group", ...)``), a run must give
    what solving each group whole gives.
    """
    solve_whole = run_class._compute_group
    split: list[list[str]] = []
    fractions = [0.0, *cuts, 1.0]

    def in_parts(self: Any, group: Any) -> Any:
        rows = self._solver(None).split
        if not rows.can_split(group):
            return solve_whole(self, group)
        split.append(list(group.names))
        prepared = rows.prepare(group)
        parts = [rows.compute_rows(group, prepared, start, stop) for start, stop in zip(fractions, fractions[1:])]
        return rows.join(group, prepared, parts)

    return in_parts, split
