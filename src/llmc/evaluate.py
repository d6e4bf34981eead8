"""Perplexity on held-out text: the quick quality check behind ``llmc eval`` and the demo.

Perplexity of a compressed model against the original on the same tokens is the cheapest signal
that compression kept the model working. The default text is the held-out split of the embedded
corpus, so the check runs on machines that cannot reach the hub and its numbers are comparable
between runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmc.args import DatasetArguments, ModelArguments
from llmc.data.sources import load_raw_dataset
from llmc.errors import ArgumentError, DataError, closest
from llmc.models import load_model, load_tokenizer

__all__ = ["HELDOUT_PRESET", "heldout_token_ids", "load_model_for_eval", "perplexity"]

HELDOUT_PRESET = "llmc:stdlib-docs-heldout"


def heldout_token_ids(
    tokenizer: Any,
    dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict | None = None,
    text_column: str = "text",
    max_documents: int | None = None,
    *,
    splits: str | None = None,
) -> torch.Tensor:
    """All documents' tokens as one 1-D LongTensor, documents separated by eos.

    One stream rather than one sample per document, so that ``perplexity`` can cut it into
    chunks of equal length: every predicted token then has a context of comparable size, and the
    number does not depend on how long the documents happen to be. No BOS is inserted; documents
    are tokenized without special tokens, as in a pretraining stream.
    """
    if max_documents is not None and max_documents <= 0:
        raise ArgumentError(
            f"'max_documents' must be a positive integer (got {max_documents!r})",
            name="max_documents",
        )
    if dataset is None:
        dataset = HELDOUT_PRESET
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    rows = load_raw_dataset(
        DatasetArguments(dataset=dataset, splits=splits, text_column=text_column)
    )
    if text_column not in rows.column_names:
        match = closest(text_column, rows.column_names)
        raise DataError(
            f"column {text_column!r} not found in the evaluation data "
            f"(columns: {', '.join(rows.column_names) or 'none'}); "
            + (f"did you mean {match!r}? " if match else "")
            + "pass text_column=..."
        )
    if max_documents is not None and max_documents < len(rows):
        rows = rows.select(range(max_documents))
    texts = [t for t in rows[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(
            f"the evaluation data has no text in column {text_column!r} ({len(rows)} rows)"
        )
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    if len(stream) < 2:
        raise DataError(
            f"the evaluation text gives {len(stream)} tokens; perplexity needs at least 2"
        )
    return torch.tensor(stream, dtype=torch.long)


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the embedding's device (the first layer, also when dispatched)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_chunks: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """exp of the mean next-token negative log-likelihood over non-overlapping chunks.

    ``token_ids [N]`` is cut into chunks of ``seq_len`` (a shorter last chunk is kept when it
    predicts at least one token); within a chunk every token after the first is predicted, and
    the mean is over all predicted tokens of all chunks. Log-probabilities are computed in fp32
    and summed in fp64, so a bf16 model is not penalized by accumulation error. Inputs go to
    ``device``, by default the device of the model's input embeddings; the model is not moved.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ArgumentError(f"'{name}' must be a positive integer (got {value!r})", name=name)
    if seq_len < 2:
        raise ArgumentError(f"'seq_len' must be at least 2 (got {seq_len})", name="seq_len")
    if max_chunks is not None and max_chunks <= 0:
        raise ArgumentError(
            f"'max_chunks' must be a positive integer (got {max_chunks!r})", name="max_chunks"
        )
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise DataError(f"perplexity needs at least 2 tokens (got {ids.numel()})")
    chunks = [
        (start, min(seq_len, ids.numel() - start)) for start in range(0, ids.numel(), seq_len)
    ]
    chunks = [(start, length) for start, length in chunks if length >= 2]
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    target = torch.device(device) if device is not None else _input_device(model)

    # Chunks of one length form the batches; only the last chunk can be shorter.
    batches: list[list[tuple[int, int]]] = []
    for chunk in chunks:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] == chunk[1]:
            batches[-1].append(chunk)
        else:
            batches.append([chunk])

    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(chunks), desc="perplexity", unit="chunks", leave=False) as progress,
        ):
            for batch in batches:
                length = batch[0][1]
                inputs = torch.stack([ids[s : s + length] for s, _ in batch]).to(target)  # [B, L]
                logits = model(input_ids=inputs, use_cache=False).logits  # [B, L, V]
                for row in range(len(batch)):
                    nll = F.cross_entropy(
                        logits[row, :-1].float(), inputs[row, 1:], reduction="sum"
                    )  # over the L-1 predicted tokens
                    total_nll += nll.double().cpu()
                total_tokens += len(batch) * (length - 1)
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return math.exp(total_nll.item() / total_tokens)


def load_model_for_eval(
    path_or_name: Any,
    precision: str = "auto",
    trust_remote_code: bool = False,
    device: str | None = None,
) -> tuple[Any, Any]:
    """The model and its tokenizer, ready for ``perplexity``.

    Compressed-tensors checkpoints (ours included) load through transformers, which dequantizes
    them with the ``compressed-tensors`` package: evaluating through that independent reader is
    what shows that a checkpoint we wrote is usable by others.
    """
    model_args = ModelArguments(
        model=path_or_name,
        precision=precision,
        trust_remote_code=trust_remote_code,
        device=device,
    )
    model = load_model(model_args)
    tokenizer = load_tokenizer(model_args, model)
    model.eval()
    return model, tokenizer
