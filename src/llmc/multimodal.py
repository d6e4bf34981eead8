"""Vision-language models: the language model is compressed, the encoders are left alone.

A vision-language model (Qwen2.5-VL) loads through ``AutoModelForImageTextToText``
(``llmc.models``) and holds, beside its language model, encoders for other modalities (the
vision tower ``model.visual``, with its merger) and sometimes a projector between them. Text
calibration never runs them, and their Linears are small and sensitive, so llm-compressor's
recipes ignore them (``re:visual.*``). ``mark_encoders_`` does the same for every recipe: the
Linears outside the language model (transformers' ``get_decoder()``) and the output head are
marked so that class-name targets (``Linear``) pass over them (``llmc.targets``); a recipe
still reaches them by name or regular expression. A model without an encoder for another
modality (every causal LM) is left unmarked.
"""

from __future__ import annotations

from torch import nn

from llmc.targets import mark_class_targets_skip_

__all__ = ["mark_encoders_"]

_MODALITIES = ("image", "video", "audio")


def _language_model(model: nn.Module) -> nn.Module | None:
    """The language model of a model with an encoder for another modality, else None."""
    get_encoder, get_decoder = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
    if not (callable(get_encoder) and callable(get_decoder)):
        return None
    encoders = []
    for modality in _MODALITIES:
        try:
            encoder = get_encoder(modality=modality)
        except (TypeError, ValueError):  # an override without modalities (encoder-decoder text models)
            return None
        if encoder is not model and encoder is not getattr(model, "base_model", model):
            encoders.append(encoder)
    decoder = get_decoder()
    if not encoders or decoder is model or any(encoder is decoder for encoder in encoders):
        return None
    return decoder


def mark_encoders_(model: nn.Module) -> list[str]:
    """Mark the Linears of ``model`` outside its language model and output head (see the module
    docstring); returns their names, none for a model without another modality's encoder."""
    decoder = _language_model(model)
    if decoder is None:
        return []
    inside = {id(module) for module in decoder.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    marked = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in inside and module is not head:
            mark_class_targets_skip_(module, "encoder")
            marked.append(name)
    return marked
