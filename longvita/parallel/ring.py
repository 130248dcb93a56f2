"""Zigzag ring attention: context parallelism over torch.distributed, forward and backward.

Every rank holds the zigzag shard of q, k, v (chunks r and 2P-1-r of every document,
see ``longvita.parallel.zigzag``). K/V blocks travel round the ring (rank r sends to r+1,
receives from r-1) with ``batch_isend_irecv``, double-buffered: step i+1's transfer is
posted before step i's compute, so the link works while the rank computes. Only the
K/V heads travel (GQA: never repeated), packed in one (2, tokens, Hkv, D) buffer.

At step i rank r holds the K/V of source s = (r - i) mod P and computes only the part
its queries can see (causal):
    s == r: causal attention of the local sequence to itself (chunk r < chunk 2P-1-r,
            so causal over the local concatenation is causal in global order);
    s <  r: every local query against the source's first chunk (chunk s), no mask;
    s >  r: the local second chunk against both source chunks, no mask.
So every step costs every rank the same. Non-causal attention sees every block, with
the padded keys (always the tail of a local document) cut away.

Partial results merge through the LSE into fp32 accumulators (``lse_merge_``) and are
rounded once at the end. The backward is the standard ring-flash-attention one: every
block's gradients use the final (out, lse), since P_block = exp(S_block - lse); dQ
accumulates locally in fp32, dK/dV (fp32) travel round the ring with their K/V block and
arrive home after P steps. The gradient of the returned LSE enters as
Delta = rowsum(dout * out) - dlse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longvita.parallel.groups import rank_world
from longvita.parallel.zigzag import ZigzagLayout, _as_layout
from longvita.kernels import lse_merge_
from longvita.kernels.attention import check_qkv, varlen_attention_bwd, varlen_attention_fwd


class RingComm:
    """Point-to-point traffic of one ring: send to the next rank, receive from the previous.

    ``send_recv`` queues a pair of operations, ``commit`` posts the queued batch,
    ``wait`` blocks until it is done (sends included, so the buffers are free again).
    """

    def __init__(self, group: dist.ProcessGroup | None, tag: int = 0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        pg = group if group is not None else dist.group.WORLD
        self.send_peer = dist.get_global_rank(pg, (self.rank + 1) % self.world_size)
        self.recv_peer = dist.get_global_rank(pg, (self.rank - 1) % self.world_size)
        self.tag = tag  # gloo matches messages by tag; the K/V and dK/dV rings use two
        self._ops: list[dist.P2POp] = []
        self._reqs = None

    def send_recv(self, to_send: torch.Tensor, recv_buf: torch.Tensor | None = None) -> torch.Tensor:
        if recv_buf is None:
            recv_buf = torch.empty_like(to_send)
        self._ops.append(dist.P2POp(dist.isend, to_send, self.send_peer, self.group, self.tag))
        self._ops.append(dist.P2POp(dist.irecv, recv_buf, self.recv_peer, self.group, self.tag))
        return recv_buf

    def commit(self) -> None:
        if self._reqs is not None:
            raise RuntimeError("RingComm.commit called twice without wait")
        self._reqs = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait called without commit")
        for req in self._reqs:
            req.wait()
        self._reqs = None


@dataclass(frozen=True)
class RingParams:
    """Options of one ring attention call that are not tensors."""

    group: dist.ProcessGroup | None
    causal: bool
    softmax_scale: float | None
    backend: str | None


def ring_block(layout: ZigzagLayout, rank: int, src: int, causal: bool):
    """(cu_q, cu_k, max_q, max_k, causal) of the sub-block rank ``rank`` computes
    against the K/V block of rank ``src``."""
    n, c = layout.max_seqlen_local, layout.max_chunk
    if not causal:
        return layout.cu_q_full, layout.cu_k_valid[src], n, n, False
    if src == rank:
        return layout.cu_seqlens_local, layout.cu_seqlens_local, n, n, True
    if src < rank:
        return layout.cu_q_before, layout.cu_k_before, n, c, False
    return layout.cu_q_after, layout.cu_k_after, c, n, False


def _ring_forward(q, kv, layout: ZigzagLayout, p: RingParams):
    rank, world = rank_world(p.group)
    comm = RingComm(p.group) if world > 1 else None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 accumulators
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=acc, device=q.device)
    bufs = (kv, torch.empty_like(kv) if world > 1 else kv)
    for step in range(world):
        cur = bufs[step % 2]
        if step + 1 < world:  # post the next block's transfer before this block's compute
            comm.send_recv(cur, bufs[(step + 1) % 2])
            comm.commit()
        cu_q, cu_k, max_q, max_k, causal = ring_block(layout, rank, (rank - step) % world, p.causal)
        out_b, lse_b = varlen_attention_fwd(
            q, cur[0], cur[1], cu_q, cu_k, max_q, max_k, p.softmax_scale, causal, backend=p.backend
        )
        if step == 0:
            out.copy_(out_b)
            lse.copy_(lse_b)
        else:
            lse_merge_(out, lse, out_b, lse_b, backend=p.backend)
        if step + 1 < world:
            comm.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, dlse, q, kv, out, lse, layout: ZigzagLayout, p: RingParams):
    rank, world = rank_world(p.group)
    kv_comm = RingComm(p.group, tag=0) if world > 1 else None
    dkv_comm = RingComm(p.group, tag=1) if world > 1 else None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv_bufs = (kv, torch.empty_like(kv) if world > 1 else kv)
    dkv_bufs = [torch.empty(kv.shape, dtype=acc, device=kv.device)]
    if world > 1:
        dkv_bufs.append(torch.empty_like(dkv_bufs[0]))
    for step in range(world):
        cur = kv_bufs[step % 2]
        if step + 1 < world:
            kv_comm.send_recv(cur, kv_bufs[(step + 1) % 2])
            kv_comm.commit()
        cu_q, cu_k, max_q, max_k, causal = ring_block(layout, rank, (rank - step) % world, p.causal)
        dq_b, dk_b, dv_b = varlen_attention_bwd(
            dout, q, cur[0], cur[1], out, lse, cu_q, cu_k, max_q, max_k, p.softmax_scale, causal,
            dlse=dlse, backend=p.backend,
        )
        dq.add_(dq_b)
        dkv = dkv_bufs[step % 2]
        if step == 0:
            dkv[0].copy_(dk_b)
            dkv[1].copy_(dv_b)
        else:
            dkv_comm.wait()  # dkv now holds the grads earlier ranks accumulated for this block
            dkv[0].add_(dk_b)
            dkv[1].add_(dv_b)
        if step + 1 < world:
            kv_comm.wait()
        if world > 1:  # pass the block's grads on with it; after P steps they are home
            dkv_comm.send_recv(dkv, dkv_bufs[(step + 1) % 2])
            dkv_comm.commit()
    if world > 1:
        dkv_comm.wait()
    dkv = dkv_bufs[world % 2] if world > 1 else dkv_bufs[0]
    return dq, dkv


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: ZigzagLayout, params: RingParams):
        # (2, tokens, Hkv, D): one message per step. The ring receives into this buffer
        # in place, so it is our own copy and k, v themselves are what backward keeps.
        kv = torch.stack([k, v])
        out, lse = _ring_forward(q, kv, layout, params)
        # padding rows: out = 0 and lse = -inf, constants that pass no gradient. The
        # backward keeps the finite lse (its blocks then never see exp(S + inf)) and
        # zeroes dout/dlse there instead.
        pad = ~layout.real_tokens[rank_world(params.group)[0]]
        out.masked_fill_(pad[:, None, None], 0)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.layout, ctx.params = layout, params
        ctx.set_materialize_grads(False)
        return out, lse.masked_fill(pad[None], float("-inf"))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pad = ctx.saved_tensors
        kv = torch.stack([k, v])
        dout = torch.zeros_like(out) if dout is None else dout.masked_fill(pad[:, None, None], 0)
        if dlse is not None:
            dlse = dlse.masked_fill(pad[None], 0)
        dq, dkv = _ring_backward(dout.contiguous(), dlse, q, kv, out, lse, ctx.layout, ctx.params)
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None


def _check_inputs(q, k, v, layout: ZigzagLayout, world: int) -> None:
    check_qkv(q, k, v)
    if layout.world_size != world:
        raise ValueError(f"the zigzag layout is for {layout.world_size} ranks but the process group has {world}")
    if layout.cu_seqlens_local.device != q.device:
        raise ValueError(
            f"the zigzag layout lives on {layout.cu_seqlens_local.device} but q is on {q.device}: "
            "build it with zigzag_layout(cu_seqlens, world_size, device=q.device)"
        )
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] != layout.total_local:
            raise ValueError(
                f"{name} must hold this rank's {layout.total_local} zigzag-local tokens "
                f"(zigzag_shard of the packed sequence), got {t.shape[0]}"
            )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | ZigzagLayout,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Exact attention over packed documents split zigzag over the ranks of ``group``.

    Every rank of ``group`` calls it with its own shard (collective). ``group=None``
    means the default group; without torch.distributed initialised it runs on one rank.

    Args:
        q: (total_local, Hq, D), this rank's ``zigzag_shard`` of the packed queries.
        k, v: (total_local, Hkv, D), Hq % Hkv == 0 (GQA; only the Hkv heads travel).
        cu_seqlens: the GLOBAL (B+1,) int32/int64 document offsets of the unsharded
            packed sequence (the same as given to ``zigzag_shard``; one document
            ``[0, total]`` when a stage packs without resetting the mask), or a
            ``ZigzagLayout`` from ``zigzag_layout(cu_seqlens, P, device)``. Pass the
            layout when calling many layers on one batch: from a tensor the layout is
            rebuilt, which reads cu_seqlens on the host.
        causal: causal over each document (global order), else bidirectional within
            each document; padded keys are never visible to a real query.
        softmax_scale: default D ** -0.5.
        return_lse: also return lse (Hq, total_local) fp32, natural log, differentiable.
        backend: the per-block attention backend (None/'auto', 'torch', 'triton', ...).

    Returns:
        out (total_local, Hq, D) in q's dtype, or (out, lse). Padding rows give
        out = 0 and lse = -inf and pass no gradient (``zigzag_unshard`` drops them).
    """
    rank, world = rank_world(group)
    layout = _as_layout(cu_seqlens, world, q.device if isinstance(q, torch.Tensor) else None)
    _check_inputs(q, k, v, layout, world)
    params = RingParams(group, bool(causal), softmax_scale, backend)
    out, lse = _RingAttentionFunction.apply(q, k, v, layout, params)
    return (out, lse) if return_lse else out
