"""Hybrid context parallelism: Ulysses (all-to-all over heads) inside groups of U ranks, the
zigzag ring across them (USP, LoongTrain's double ring, TransformerEngine's a2a+p2p).

A context-parallel group of C = U x R ranks is R ring positions of U ranks each: CP rank
c is Ulysses rank ``c % U`` of ring position ``c // U`` (so a Ulysses group is U
consecutive ranks, meant for the fast link, and the ring runs across the groups). The
packed sequence is cut zigzag over the R ring positions (``zigzag_layout(cu, R)``), and
each ring position's local rows are cut into U contiguous parts (the last padded), one per
rank. In attention, within each Ulysses group an all-to-all turns (rows, all heads) into
(all rows of the ring position, Hq/U heads); the ring attends over those rows across the R
groups exactly as ``ring_attention`` does; a second all-to-all turns the result back.
U = 1 is the plain ring; R = 1 is pure Ulysses.

Heads: Hq must divide by U. K/V heads divide by U too, or, when U is larger than the KV
head count (Qwen2.5-14B has 8), each KV head is replicated U / Hkv times before the
all-to-all, so every rank holds the one KV head its query heads read; autograd sums the
replicas' gradients back into the head. Every collective is differentiable: the backward
of an all-to-all over heads is the reverse all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvita.kernels.attention import check_qkv
from longvita.model import DecoderAttention
from longvita.parallel.mesh import CPGroups, ParallelConfigError
from longvita.parallel.ring import ring_attention
from longvita.parallel.zigzag import ZigzagLayout

__all__ = ["UlyssesRingAttention", "check_ulysses_heads", "hybrid_attention", "ulysses_rows"]


def check_ulysses_heads(ulysses: int, num_heads: int, num_kv_heads: int) -> None:
    """ParallelConfigError unless ``ulysses`` (U) can split these heads: U divides the query
    heads, and divides the KV heads or is a multiple of them (the KV heads are then
    replicated)."""
    if ulysses <= 1:
        return
    if ulysses > num_heads or num_heads % ulysses:
        raise ParallelConfigError(f"--ulysses {ulysses} must divide the model's {num_heads} attention heads")
    if num_kv_heads % ulysses and ulysses % num_kv_heads:
        raise ParallelConfigError(f"--ulysses {ulysses} must divide the model's {num_kv_heads} key/value heads or be a "
                                  f"multiple of them (then each is replicated)")


def ulysses_rows(n_ring: int, ulysses: int) -> int:
    """Rows each rank of a Ulysses group holds of a ring position's ``n_ring`` rows."""
    return -(-n_ring // ulysses)


class _AllToAll(torch.autograd.Function):
    """``to_heads``: (n, H, D) rows of this rank, all heads -> (U*n, H/U, D) the rows of
    every rank of the group (in rank order), this rank's slice of the heads. Else the
    reverse. The backward is the other direction."""

    @staticmethod
    def forward(ctx, x, group, ulysses: int, to_heads: bool):
        ctx.group, ctx.ulysses, ctx.to_heads = group, ulysses, to_heads
        return _all_to_all(x, group, ulysses, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.ulysses, not ctx.to_heads), None, None, None


def _all_to_all(x: torch.Tensor, group, u: int, to_heads: bool) -> torch.Tensor:
    if to_heads:
        n, h, d = x.shape
        send = x.reshape(n, u, h // u, d).transpose(0, 1).contiguous()  # (U, n, H/U, D): block j to rank j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's rows, my heads
        return recv.reshape(u * n, h // u, d)
    un, hu, d = x.shape
    send = x.reshape(u, un // u, hu, d).contiguous()  # block j: rank j's rows, my heads
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: my rows, rank i's heads
    return recv.transpose(0, 1).reshape(un // u, u * hu, d)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ZigzagLayout,
    *,
    groups: CPGroups,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Exact attention over packed documents split over a (ring x Ulysses) CP group.

    Every rank of ``groups.group`` calls it with its own rows (collective).
    q: (n, Hq, D), k, v: (n, Hkv, D), this rank's rows: part ``groups.ulysses_rank`` of the
    ring position's zigzag rows (``ulysses_rows(layout.total_local, U)`` rows, the last
    rank's tail padding). layout: ``zigzag_layout(cu_seqlens, R)`` over the ring positions.
    Returns out (n, Hq, D) (padding rows 0) or (out, lse) with lse (Hq, n) fp32 (padding
    -inf), both differentiable, as ``ring_attention``."""
    u = groups.ulysses_degree
    if u == 1:
        return ring_attention(q, k, v, layout, group=groups.ring, causal=causal, softmax_scale=softmax_scale,
                              return_lse=return_lse, backend=backend)
    check_qkv(q, k, v)
    check_ulysses_heads(u, q.shape[1], k.shape[1])
    n_ring = layout.total_local
    n = ulysses_rows(n_ring, u)
    if q.shape[0] != n:
        raise ValueError(f"q must hold this rank's {n} rows ({n_ring} ring-local rows over {u} Ulysses ranks), "
                         f"got {q.shape[0]}")
    if k.shape[1] < u:  # replicate each KV head so that every rank holds the one its queries read
        k = k.repeat_interleave(u // k.shape[1], dim=1)
        v = v.repeat_interleave(u // v.shape[1], dim=1)
    qh, kh, vh = (_AllToAll.apply(t.contiguous(), groups.ulysses, u, True)[:n_ring] for t in (q, k, v))
    out, lse = ring_attention(qh, kh, vh, layout, group=groups.ring, causal=causal, softmax_scale=softmax_scale,
                              return_lse=True, backend=backend)  # (n_ring, Hq/U, D), (Hq/U, n_ring)
    pad = n * u - n_ring
    out = torch.cat([out, out.new_zeros(pad, *out.shape[1:])]) if pad else out
    out = _AllToAll.apply(out.contiguous(), groups.ulysses, u, False)  # (n, Hq, D)
    if not return_lse:
        return out
    lse = torch.cat([lse, lse.new_full((lse.shape[0], pad), float("-inf"))], 1) if pad else lse
    lse = _AllToAll.apply(lse.t().unsqueeze(-1).contiguous(), groups.ulysses, u, False)  # (n, Hq, 1)
    return out, lse.squeeze(-1).t()


class UlyssesRingAttention(DecoderAttention):
    """The decoder's attention over a (ring x Ulysses) CP group (``hybrid_attention``, causal)."""

    def __init__(self, layout: ZigzagLayout, groups: CPGroups):
        self.layout, self.groups = layout, groups

    def attend(self, layer_idx, q, k, v):
        return hybrid_attention(q, k, v, self.layout, groups=self.groups, causal=True)

    def attend_with_lse(self, layer_idx, q, k, v):
        return hybrid_attention(q, k, v, self.layout, groups=self.groups, causal=True, return_lse=True)
