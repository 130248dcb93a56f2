"""The attention implementation ``"longvita"`` for transformers' ``AttentionInterface``.

transformers' attention modules (Qwen2, Qwen3, Llama, Mistral, InternViT, ...) call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value,
attention_mask, scaling=..., dropout=..., sliding_window=..., **kwargs)`` with query
(B, Hq, Lq, D) and key/value (B, Hkv, Lk, D) -- RoPE applied, K/V already joined to the
layer's KV cache -- and take (B, Lq, Hq, D) back. ``longvita_attention`` lays the tokens
out as packed documents (THD rows, int32 ``cu_seqlens``) and calls
``kernels.varlen_attention`` (bottom-right causal, GQA without repeating K/V, flash-attn
windows). Where the documents are is read from what the caller gave, first match wins:

1. ``longvita_cp=CPShard`` (put in the batch by ``shard_batch``): this rank's zigzag shard
   of one packed sequence; ``parallel.ring_attention`` over the shard's process group.
2. a 2-D padding mask (B, Lk), True on real tokens: unpad, one document per row, pad the
   output back with zeros. Exact for padding anywhere in a row: among a row's real tokens
   causal order is position order, and the real queries are the row's last real keys, so
   bottom-right causal attention over the unpadded row is the padded causal mask.
3. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (+ ``max_length_q`` / ``max_length_k``), as
   ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes them: documents of
   the flattened B * L tokens.
4. ``position_ids`` (B, L) when this forward has no earlier cached keys (Lq == Lk): a token
   whose position is not its left neighbour's + 1 opens a document (the rule of
   transformers' own packed-sequence mask), ``DataCollatorWithFlattening``'s default. A
   fresh cache (``use_cache=True`` in training) changes nothing: documents never see each
   other either way.
5. otherwise one document per row: a prompt, or new tokens against a KV cache (Lq <= Lk).

Layouts 2-4 are derived once per forward and reused by every layer (``_LayoutCache``, keyed
by the tensor they were read from, which transformers passes unchanged to each layer): at
most one host sync per forward (the longest document), never one per layer.

Memory beyond the kernel's: the THD copies of q, k, v (the (B, H, L, D) -> (B*L, H, D)
transpose) and, for a padded batch, the zero-padded output.

A mask function is registered beside it (``AttentionMaskInterface``): transformers builds
no mask at all for an implementation it does not know, which would drop the padding. Ours
passes the 2-D padding mask through, or None when nothing is padded (as flash-attention's).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvita.kernels import varlen_attention
from longvita.parallel import CPShard, ring_attention

__all__ = ["ATTN_IMPLEMENTATION", "CP_KWARG", "TokenLayout", "longvita_attention", "longvita_attention_mask",
           "register"]

ATTN_IMPLEMENTATION = "longvita"
CP_KWARG = "longvita_cp"  # the batch key (and attention kwarg) carrying a CPShard


@dataclass(frozen=True)
class TokenLayout:
    """Where one forward's queries (B, Lq) and keys (B, Lk) sit as packed documents.

    index_q, index_k: (Nq,), (Nk,) int64 rows of the flattened B * Lq queries / B * Lk keys
    that take part (padding left out), or None for every row. cu_q, cu_k: (docs + 1,) int32
    offsets into those rows. max_q, max_k: the longest document, Python ints.
    """

    index_q: torch.Tensor | None
    index_k: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _rows_layout(batch: int, len_q: int, len_k: int, device) -> TokenLayout:
    """One document per row (no host sync)."""
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return TokenLayout(None, None, rows * len_q, rows * len_k, len_q, len_k)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _padding_layout(mask: torch.Tensor, batch: int, len_q: int, len_k: int) -> TokenLayout:
    if mask.shape[0] != batch:
        raise ValueError(f"attention_mask must have the batch's {batch} rows, got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    if mask.shape[1] > len_k:
        mask = mask[:, -len_k:]
    if mask.shape[1] < len_q:
        raise ValueError(f"attention_mask covers {mask.shape[1]} keys, fewer than the {len_q} queries")
    # a static cache hands over all its slots: those past the mask hold no token yet
    keys = F.pad(mask, (0, len_k - mask.shape[1]))  # (B, Lk)
    queries = mask[:, mask.shape[1] - len_q:]  # (B, Lq): the last Lq positions
    lens_q, lens_k = queries.sum(1, dtype=torch.int32), keys.sum(1, dtype=torch.int32)
    max_q, max_k = torch.stack([lens_q.max(), lens_k.max()]).tolist()  # the one host sync
    return TokenLayout(queries.flatten().nonzero().squeeze(1), keys.flatten().nonzero().squeeze(1),
                       _offsets(lens_q), _offsets(lens_k), int(max_q), int(max_k))


def _max_length(given, cu: torch.Tensor) -> int:
    if given is None:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return int(given)


def _offsets_layout(cu_q, cu_k, max_q, max_k, device) -> TokenLayout:
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor of documents + 1 offsets, got {cu!r}")
    cu_q = cu_q.to(device=device, dtype=torch.int32)
    cu_k = cu_q if cu_k is cu_q else cu_k.to(device=device, dtype=torch.int32)
    return TokenLayout(None, None, cu_q, cu_k, _max_length(max_q, cu_q), _max_length(max_k, cu_k))


def _position_layout(position_ids: torch.Tensor, batch: int, length: int, device) -> TokenLayout:
    pos = position_ids.to(device).expand(batch, length)
    starts = torch.ones((batch, length), dtype=torch.bool, device=device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # (B, L): a token that opens a document
    first = starts.flatten().nonzero().squeeze(1)  # (docs,)
    cu = torch.cat([first, first.new_full((1,), batch * length)]).to(torch.int32)
    return TokenLayout(None, None, cu, cu, _max_length(None, cu), _max_length(None, cu))


class _LayoutCache:
    """The layouts of the last few forwards, each keyed by the tensor it was read from (held
    weakly, with its version counter, so a freed or modified tensor never hits)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[int, tuple] = {}

    def get(self, tensor: torch.Tensor, key: tuple, build) -> TokenLayout:
        if torch.compiler.is_compiling():
            return build()
        try:
            version = tensor._version
        except RuntimeError:  # an inference-mode tensor has no version counter: no caching
            return build()
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1:3] == (version, key):
            return entry[3]
        layout = build()
        if len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[id(tensor)] = (weakref.ref(tensor), version, key, layout)
        return layout


_CACHE = _LayoutCache()


def _layout(attention_mask, kwargs: dict, batch: int, len_q: int, len_k: int, device) -> TokenLayout:
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            got = f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(
                f"longvita attention takes a 2-D (batch, keys) padding mask, got {got}: give documents as "
                "position_ids that restart or as cu_seq_lens_q/k instead of a 4-D mask"
            )
        return _CACHE.get(attention_mask, ("mask", batch, len_q, len_k),
                          lambda: _padding_layout(attention_mask, batch, len_q, len_k))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("pass cu_seq_lens_q and cu_seq_lens_k together")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return _CACHE.get(cu_q, ("offsets", id(cu_k), max_q, max_k, str(device)),
                          lambda: _offsets_layout(cu_q, cu_k, max_q, max_k, device))
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and len_q == len_k > 1 and pos.shape[-1] == len_q:
        if pos.dim() == 1:
            pos = pos[None]
        if pos.dim() == 2 and pos.shape[0] in (1, batch):  # (3, B, L) multimodal RoPE positions do not qualify
            return _CACHE.get(pos, ("positions", batch, len_q, str(device)),
                              lambda: _position_layout(pos, batch, len_q, device))
    return _rows_layout(batch, len_q, len_k, device)


def _window(sliding_window: int | None, causal: bool, max_k: int) -> tuple[int, int]:
    """transformers' sliding window (a query sees the ``w`` keys up to itself: q - k < w) as
    flash-attn's (left, right); none at all where no document is longer than the window,
    which keeps the CPU path's fused kernel eligible."""
    if sliding_window is None or max_k <= sliding_window:
        return (-1, -1)
    left = int(sliding_window) - 1
    return (left, 0 if causal else left)


def _common_dtype(query, key, value):
    """One dtype for q, k, v: autocast's when it is on (as SDPA under autocast), else theirs
    (promoted when they differ)."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif query.dtype == key.dtype == value.dtype:
        return query, key, value
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _ring(shard, q, k, v, batch, len_q, len_k, scaling, causal, sliding_window):
    if not isinstance(shard, CPShard):
        raise TypeError(f"{CP_KWARG} must be the CPShard that shard_batch puts in the batch, got {type(shard).__name__}")
    if batch != 1:
        raise ValueError(f"a context-parallel forward takes one packed row (what shard_batch returns), got {batch} rows")
    if len_k != len_q:
        raise ValueError(
            f"a context-parallel forward cannot attend to earlier cached tokens ({len_k - len_q} here): "
            "pass use_cache=False (shard_batch does)"
        )
    lengths = shard.layout.doc_lengths
    if sliding_window is not None and lengths.numel() and int(lengths.max()) > sliding_window:
        raise NotImplementedError(
            f"ring attention has no sliding window: a document of {int(lengths.max())} tokens is longer than "
            f"the model's sliding_window ({sliding_window}); pack documents no longer than the window"
        )
    return ring_attention(q, k, v, shard.layout, group=shard.group, causal=causal, softmax_scale=scaling)


def longvita_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, computed by longvita's kernels.

    Args:
        module: the calling attention module (its ``is_causal`` is the default).
        query: (B, Hq, Lq, D). key, value: (B, Hkv, Lk, D), Hq % Hkv == 0 (GQA, never repeated).
        attention_mask: None, or the (B, Lk') bool padding mask of ``longvita_attention_mask``
            (True = real token; Lk' < Lk for a static cache's unused slots).
        scaling: softmax scale (default D ** -0.5). dropout: must be 0 (no attention dropout).
        sliding_window: a query sees this many keys up to itself, or None.
        kwargs: ``cu_seq_lens_q/k``, ``max_length_q/k``, ``position_ids``, ``longvita_cp``
            (see the module docstring); others are ignored.

    Returns:
        ((B, Lq, Hq, D) in q's dtype, None): no attention weights. Padding rows are 0.
    """
    if dropout:
        raise ValueError(
            f"longvita attention has no attention dropout: set {type(module).__name__}'s config.attention_dropout "
            f"to 0 (got {dropout})"
        )
    if softcap is not None:
        raise ValueError(f"longvita attention has no attention-logit soft-capping (softcap={softcap})")
    if s_aux is not None:
        raise ValueError("longvita attention has no attention sinks (s_aux)")
    batch, heads, len_q, dim = query.shape
    len_k = key.shape[2]
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    query, key, value = _common_dtype(query, key, value)
    q = query.transpose(1, 2).reshape(batch * len_q, heads, dim)  # (B*Lq, Hq, D)
    k = key.transpose(1, 2).reshape(batch * len_k, key.shape[1], key.shape[3])  # (B*Lk, Hkv, D)
    v = value.transpose(1, 2).reshape(batch * len_k, value.shape[1], value.shape[3])

    shard = kwargs.get(CP_KWARG)
    if shard is not None:
        out = _ring(shard, q, k, v, batch, len_q, len_k, scaling, causal, sliding_window)
        return out.view(batch, len_q, heads, -1), None

    layout = _layout(attention_mask, kwargs, batch, len_q, len_k, query.device)
    if layout.index_q is not None:
        q = q.index_select(0, layout.index_q)
    if layout.index_k is not None:
        k, v = k.index_select(0, layout.index_k), v.index_select(0, layout.index_k)
    out = varlen_attention(
        q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, softmax_scale=scaling, causal=causal,
        window_size=_window(sliding_window, causal, layout.max_k),
    )
    if layout.index_q is not None:  # padding rows: zeros, no gradient
        out = out.new_zeros((batch * len_q, *out.shape[1:])).index_copy(0, layout.index_q, out)
    return out.view(batch, len_q, heads, -1), None


def longvita_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask-interface signature: the (batch, keys) bool padding mask, cut to the
    layer's ``kv_length`` keys (a sliding layer's cache keeps fewer), or None when no key is
    padding. Packing and causality are the attention function's own business."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if not torch.compiler.is_compiling() and mask.shape[-1] == kv_length and bool(mask.all()):
        return None  # (under torch.compile the all-True mask goes through: same numbers, no data-dependent branch)
    return mask


def register() -> None:
    """Register ``"longvita"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, longvita_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, longvita_attention_mask)
