"""Zigzag sharding of packed sequences for context parallelism (docs/architecture.md, "Distributed").

With P ranks, every document of a packed sequence is padded at its end to a multiple
of 2P tokens and cut into 2P equal chunks; rank r keeps chunks r and 2P-1-r of every
document, in document order (per document: chunk r, then chunk 2P-1-r). Under a causal
mask the early chunk has little work and the late chunk much, so every rank gets the
same amount (a contiguous split gives the last rank (2P-1)/P times the mean).

Every rank's local layout is the same: document i has ``2 * chunk_i`` local tokens,
``chunk_i = ceil(len_i / 2P)``, so ``cu_seqlens_local`` is identical on all ranks and
the K/V blocks that travel round the ring all have one shape.

``ZigzagLayout`` holds everything ring attention needs about a packed batch (the local
offsets and the per-step ``cu_seqlens`` of the visible sub-blocks). Build it once per
batch with ``zigzag_layout`` and pass it to every attention layer: building it reads
``cu_seqlens`` on the host once, ring attention itself then never syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _check_world(rank: int | None, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def _doc_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Validated document lengths (B,) int64 on the CPU (one host read of cu_seqlens)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of batch+1 document offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    lens = cu[1:] - cu[:-1]
    if bool((lens < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    return lens


@dataclass(frozen=True)
class ZigzagLayout:
    """How a packed batch is laid out over ``world_size`` ranks (the same on every rank).

    Shapes (B documents, P = world_size, device = the attention tensors' device):
        cu_seqlens: (B+1,) int64, the original global offsets (CPU).
        doc_lengths: (B,) int64 true lengths (CPU). chunk: (B,) int64 chunk sizes (CPU).
        cu_seqlens_local: (B+1,) int32, local offsets; document i spans 2 * chunk[i].
        total_local / max_seqlen_local: ints (local tokens, longest local document).
        max_chunk: int, longest chunk.
        cu_q_before, cu_k_before: (2B+1,) int32. A K/V block from an earlier rank:
            local document i is "doc" 2i (all local queries, the source's first chunk)
            and a key-only "doc" 2i+1 (the source's second chunk, never visible).
        cu_q_after, cu_k_after: (2B+1,) int32. A K/V block from a later rank: "doc" 2i
            is the local first chunk with no keys, "doc" 2i+1 the local second chunk
            against all of the source's keys.
        real_tokens: (P, total_local) bool, True where rank r's local token is a real
            token (False for padding).
        cu_q_full: (2B+1,) int32, cu_k_valid: (P, 2B+1) int32. Non-causal: "doc" 2i
            is every local query against the real (unpadded) keys of source s, which
            are a prefix of the local document because padding sits at a document's
            end; "doc" 2i+1 holds the padded keys, with no queries.
    """

    world_size: int
    cu_seqlens: torch.Tensor
    doc_lengths: torch.Tensor
    chunk: torch.Tensor
    cu_seqlens_local: torch.Tensor
    total_local: int
    max_seqlen_local: int
    max_chunk: int
    cu_q_before: torch.Tensor
    cu_k_before: torch.Tensor
    cu_q_after: torch.Tensor
    cu_k_after: torch.Tensor
    cu_q_full: torch.Tensor
    cu_k_valid: torch.Tensor
    real_tokens: torch.Tensor

    @property
    def total(self) -> int:
        """Tokens of the unsharded packed sequence (``cu_seqlens[-1]``)."""
        return int(self.cu_seqlens[-1])

    def local_to_global(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(total_local,) int64 global index of every local token of ``rank`` and a bool
        mask of the real ones (False for padding, whose index is clamped to 0). CPU."""
        _check_world(rank, self.world_size)
        return _local_to_global(self.doc_lengths, self.chunk, rank, self.world_size)


def _local_to_global(lens: torch.Tensor, chunk: torch.Tensor, rank: int, world_size: int):
    p2 = 2 * world_size
    starts = _cumsum0(lens)[:-1]
    local_start = _cumsum0(2 * chunk)[:-1]
    doc = torch.repeat_interleave(torch.arange(chunk.numel()), 2 * chunk)  # (total_local,) document id
    j = torch.arange(doc.numel()) - local_start[doc]  # offset inside the local document
    c = chunk[doc]
    pos = torch.where(j < c, rank * c + j, (p2 - 1 - rank) * c + (j - c))  # offset inside the document
    valid = pos < lens[doc]
    return torch.where(valid, starts[doc] + pos, 0), valid


def _cumsum0(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-document lengths a_i, b_i -> offsets of the 2B "docs" a_0, b_0, a_1, b_1, ..."""
    return _cumsum0(torch.stack([a, b], 1).flatten()).to(torch.int32)


def zigzag_layout(cu_seqlens: torch.Tensor, world_size: int, device: torch.device | str | None = None) -> ZigzagLayout:
    """Build the zigzag layout of a packed batch (reads ``cu_seqlens`` on the host once).

    Args:
        cu_seqlens: (B+1,) int32/int64 global document offsets. Zero-length documents
            are allowed; the whole packed sequence as one document is ``[0, total]``.
        world_size: P, the number of context-parallel ranks.
        device: where the int32 offsets for the kernels live (default: cu_seqlens').
    """
    _check_world(None, world_size)
    lens = _doc_lengths(cu_seqlens)
    device = cu_seqlens.device if device is None else torch.device(device)
    p2 = 2 * world_size
    chunk = (lens + p2 - 1) // p2  # (B,)
    zeros = torch.zeros_like(chunk)
    local = 2 * chunk
    # real tokens of each rank's two chunks: a prefix of the local document
    r = torch.arange(world_size)[:, None]
    first = (lens[None] - r * chunk[None]).clamp(0).minimum(chunk[None])  # (P, B)
    second = (lens[None] - (p2 - 1 - r) * chunk[None]).clamp(0).minimum(chunk[None])
    valid = first + second
    cu_k_valid = torch.stack([_interleave(valid[s], local - valid[s]) for s in range(world_size)])

    def dev(t):
        return t.to(device)

    return ZigzagLayout(
        world_size=world_size,
        cu_seqlens=_cumsum0(lens),
        doc_lengths=lens,
        chunk=chunk,
        cu_seqlens_local=dev(_cumsum0(local).to(torch.int32)),
        total_local=int(local.sum()),
        max_seqlen_local=int(local.max()) if lens.numel() else 0,
        max_chunk=int(chunk.max()) if lens.numel() else 0,
        cu_q_before=dev(_interleave(local, zeros)),
        cu_k_before=dev(_interleave(chunk, chunk)),
        cu_q_after=dev(_interleave(chunk, chunk)),
        cu_k_after=dev(_interleave(zeros, local)),
        cu_q_full=dev(_interleave(local, zeros)),
        cu_k_valid=dev(cu_k_valid),
        real_tokens=dev(torch.stack([_local_to_global(lens, chunk, r, world_size)[1] for r in range(world_size)])),
    )


def _as_layout(cu_seqlens, world_size: int, device) -> ZigzagLayout:
    if isinstance(cu_seqlens, ZigzagLayout):
        if cu_seqlens.world_size != world_size:
            raise ValueError(
                f"the layout was built for world_size {cu_seqlens.world_size}, but world_size is {world_size}"
            )
        return cu_seqlens
    return zigzag_layout(cu_seqlens, world_size, device)


def zigzag_shard(
    x: torch.Tensor, cu_seqlens: torch.Tensor | ZigzagLayout, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's zigzag shard of a packed tensor.

    Args:
        x: (total, ...) packed along dim 0, total == cu_seqlens[-1].
        cu_seqlens: (B+1,) global int32 offsets (or a ``ZigzagLayout``).
        rank, world_size: r and P.

    Returns:
        x_local: (total_local, ...) chunks r and 2P-1-r of every document, padding = 0.
            Differentiable (index_select + where).
        cu_seqlens_local: (B+1,) int32 local offsets, the same on every rank.
    """
    _check_world(rank, world_size)
    layout = _as_layout(cu_seqlens, world_size, x.device)
    if x.dim() < 1 or x.shape[0] != layout.total:
        raise ValueError(f"x must have cu_seqlens[-1] = {layout.total} rows, got shape {tuple(x.shape)}")
    index, valid = layout.local_to_global(rank)
    index, valid = index.to(x.device), valid.to(x.device)
    x_local = x.index_select(0, index)
    mask = valid.view(-1, *([1] * (x.dim() - 1)))
    x_local = torch.where(mask, x_local, torch.zeros((), dtype=x.dtype, device=x.device))
    return x_local, layout.cu_seqlens_local.to(x.device)


def zigzag_unshard(
    x_local: torch.Tensor,
    cu_seqlens: torch.Tensor | ZigzagLayout,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Inverse of ``zigzag_shard`` (collective over ``group``: every rank calls it).

    All-gathers the local shards and drops the padding, so it is for outputs and tests,
    not for the attention path. ``world_size == 1`` needs no process group.

    Returns (total, ...) on every rank.
    """
    _check_world(rank, world_size)
    layout = _as_layout(cu_seqlens, world_size, x_local.device)
    if x_local.dim() < 1 or x_local.shape[0] != layout.total_local:
        raise ValueError(
            f"x_local must have {layout.total_local} rows (the local zigzag layout), got shape {tuple(x_local.shape)}"
        )
    if world_size == 1:
        shards = [x_local]
    else:
        if dist.get_world_size(group) != world_size:
            raise ValueError(f"world_size is {world_size} but the process group has {dist.get_world_size(group)} ranks")
        if dist.get_rank(group) != rank:
            raise ValueError(f"rank is {rank} but this process is rank {dist.get_rank(group)} of the group")
        shards = [torch.empty_like(x_local) for _ in range(world_size)]
        dist.all_gather(shards, x_local.contiguous(), group=group)
    total = layout.total
    out = x_local.new_zeros((total + 1, *x_local.shape[1:]))  # row `total` takes the padding
    for r, shard in enumerate(shards):
        index, valid = layout.local_to_global(r)
        index = torch.where(valid, index, total).to(x_local.device)
        out.index_put_((index,), shard)  # padding rows all land on the dump row
    return out[:total]


def visible_pairs_per_rank(
    cu_seqlens: torch.Tensor, world_size: int, scheme: str = "zigzag", causal: bool = True
) -> list[int]:
    """Visible (query, key) pairs over the real tokens whose queries each rank holds.

    ``scheme="zigzag"``: chunks r and 2P-1-r of every document (``zigzag_shard``);
    ``scheme="contiguous"``: the packed sequence cut into P equal contiguous pieces (the
    naive split). Attention work per rank is proportional to these counts, so
    max/mean is the load imbalance (zigzag: 1 up to the padding of short documents;
    contiguous, causal, one long document: (2P-1)/P).
    """
    _check_world(None, world_size)
    if scheme not in ("zigzag", "contiguous"):
        raise ValueError(f"scheme must be 'zigzag' or 'contiguous', got {scheme!r}")
    lens = _doc_lengths(cu_seqlens).tolist()
    starts = _cumsum0(torch.tensor(lens, dtype=torch.int64)).tolist()
    total = starts[-1]

    def pairs(length: int, a: int, b: int) -> int:
        """Pairs of queries at document offsets [a, b) of a document of ``length`` tokens."""
        a, b = min(max(a, 0), length), min(max(b, 0), length)
        if b <= a:
            return 0
        return (b * (b + 1) - a * (a + 1)) // 2 if causal else (b - a) * length

    counts = []
    for r in range(world_size):
        n = 0
        for start, length in zip(starts, lens):
            if scheme == "zigzag":
                c = -(-length // (2 * world_size))
                n += pairs(length, r * c, (r + 1) * c)
                n += pairs(length, (2 * world_size - 1 - r) * c, (2 * world_size - r) * c)
            else:
                lo, hi = r * total // world_size, (r + 1) * total // world_size
                n += pairs(length, lo - start, hi - start)
        counts.append(n)
    return counts
