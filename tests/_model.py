"""Tests' shorthand for the model's three steps (embed -> decoder -> logits / loss)."""

from __future__ import annotations

from longvita.model import PackedAttention


def logits(model, input_ids, pixel_values=None, *, cu_seqlens=None, index=None, inputs_embeds=None):
    """Logits of a packed input: every row, or the rows of ``index``; documents of
    ``cu_seqlens`` (default: one causal document)."""
    embeds = model.embed(input_ids, pixel_values) if inputs_embeds is None else inputs_embeds
    attention = None if cu_seqlens is None else PackedAttention(cu_seqlens)
    return model.logits(model(embeds, attention=attention), index)


def loss(model, input_ids, labels, pixel_values=None, *, cu_seqlens=None, **kwargs):
    """The fused mean cross-entropy of a packed input against row-aligned labels."""
    attention = None if cu_seqlens is None else PackedAttention(cu_seqlens)
    return model.loss(model(model.embed(input_ids, pixel_values), attention=attention), labels, **kwargs)
