"""The decoder's attention interface, and the model's own single-process implementations.

A decoder layer computes its rotated q, k, v and asks one ``DecoderAttention`` object for
the attention output; that object owns everything the layers need to know about the
batch (document offsets, a KV cache, a process group). The model implements the
single-process cases here; ``longvita.parallel.plans`` implements the context-parallel
ones (ring attention over a zigzag shard, a sharded KV cache for decoding) and the
runtime passes them in from outside, so the model never imports torch.distributed.

One object serves one forward: build it once per forward (once per decoded token), not
per layer, so its tensors (offsets) are made once.
"""

from __future__ import annotations

import torch

from longvita.kernels import varlen_attention
from longvita.model.config import TextConfig

__all__ = ["CachedAttention", "DecoderAttention", "KVCache", "PackedAttention", "positions_from_cu_seqlens"]


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids restarting at 0 in every packed document (no host sync).

    cu_seqlens: (B+1,) int offsets; total: the packed length (a Python int). Rows past
    ``cu_seqlens[-1]`` are not allowed (every row belongs to a document)."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.repeat_interleave(starts, lengths, output_size=int(total))
    return torch.arange(total, device=cu_seqlens.device) - offsets


class KVCache:
    """Keys/values of one sequence for every layer, preallocated to ``capacity`` tokens.

    k[layer], v[layer]: (capacity, kv_heads, head_dim). Decoding appends; the prefix is
    never recomputed. ``length`` counts the tokens written so far.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int = 0):
        self.k, self.v, self.length = k, v, length

    @classmethod
    def empty(cls, cfg: TextConfig, capacity: int, device, dtype) -> "KVCache":
        shape = (capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            v=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0]


class DecoderAttention:
    """What a decoder layer calls for attention during one forward.

    ``attend(layer_idx, q, k, v)``: q (n, Hq, D), k and v (n, Hkv, D) of this forward's n
    tokens (RoPE applied) -> (n, Hq, D). ``finish()`` runs once after the last layer.
    ``positions(n, device)``: the position ids this attention implies for n tokens (a
    packed batch's restart per document, a cache's continuation), or None when the caller
    must give them (a context-parallel shard's rows are not contiguous).
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def positions(self, n: int, device) -> torch.Tensor | None:
        return None


class PackedAttention(DecoderAttention):
    """Causal attention within each packed document (no cache): training and plain forwards.

    cu_seqlens: (B+1,) int32 document offsets on the tensors' device; max_seqlen: the
    longest document as a Python int (None: read from cu_seqlens, one host sync)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {got}")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen

    @classmethod
    def one_document(cls, n: int, device) -> "PackedAttention":
        """All ``n`` tokens as one causal document."""
        return cls(torch.tensor([0, n], dtype=torch.int32, device=device), n)

    def attend(self, layer_idx, q, k, v):
        return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen, causal=True)

    def positions(self, n, device):
        return positions_from_cu_seqlens(self.cu_seqlens, n)


class CachedAttention(DecoderAttention):
    """One sequence through a KV cache: append this forward's K/V, attend to all of it
    (bottom-right causal, so a chunk of n new tokens sees the prefix and itself)."""

    def __init__(self, cache: KVCache, new_tokens: int, device):
        if cache.length + new_tokens > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length} + {new_tokens} do not fit")
        self.cache, self.start, self.end = cache, cache.length, cache.length + new_tokens
        # the offsets of this forward, one host-to-device copy for all layers
        cu = torch.tensor([0, new_tokens, 0, self.end], dtype=torch.int32, device=device)
        self.cu_q, self.cu_k = cu[:2], cu[2:]

    def attend(self, layer_idx, q, k, v):
        c = self.cache
        c.k[layer_idx][self.start : self.end] = k
        c.v[layer_idx][self.start : self.end] = v
        n = self.end - self.start
        return varlen_attention(
            q, c.k[layer_idx][: self.end], c.v[layer_idx][: self.end], self.cu_q, self.cu_k, n, self.end, causal=True
        )

    def finish(self):
        self.cache.length = self.end

    def positions(self, n, device):
        return torch.arange(self.start, self.start + n, device=device)
