"""What context parallelism costs per decoder layer: bytes each rank moves and the time a
layer's attention is predicted to take, for the zigzag ring, Ulysses and their hybrid
(``ulysses.py``). ``benchmarks/bench_ring.py`` and ``bench_prefill.py`` fill it with block
timings measured on one GPU; with no GPU, from FLOPs at a stated rate.

The ring (``RingCase``, ``predict_ring``): at ring step i rank r computes its queries
against the K/V block of rank (r - i) mod P, a block whose shape depends only on whether
that source is r itself (causal diagonal), an earlier rank or a later one (``KINDS``), so
three block timings fill the P x P table of (rank, step) times. A step ends when its
slowest rank is done and its transfer has arrived: predicted ring time = sum over steps of
max(slowest rank's block, transfer), the last step sending nothing.

The hybrid (``predict_cp_layer``): cp = ring x ulysses ranks. Consecutive ranks form a
Ulysses group (``parallel/mesh.py``), so a group of U <= ``gpus_per_node`` all-to-alls over
NVLink; the ring then runs across groups on U-way head shards of the full rows of each
group (with U above the KV heads, each KV head is replicated, ``kv_heads_attended``).
The all-to-alls before (q, k, v) and after (the output) attention are not overlapped with
compute; the ring's transfers are, step by step. A ring hop that leaves a node runs at
the inter-node rate, and the slowest hop sets a step's transfer time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvita.parallel.zigzag import zigzag_layout

__all__ = ["KINDS", "Links", "RingCase", "cp_layer_bytes", "estimate_block_ms", "kind_of", "predict_cp_layer",
           "predict_ring"]

KINDS = ("diag", "before", "after")


@dataclass(frozen=True)
class RingCase:
    """One document of ``tokens`` tokens over a ring of ``world`` ranks, attention with
    ``hq`` query heads and ``hkv`` KV heads of ``d`` (Qwen2.5-14B: 40, 8, 128) in
    ``elem_bytes`` per element (bf16: 2)."""

    tokens: int
    world: int
    hq: int = 40
    hkv: int = 8
    d: int = 128
    elem_bytes: int = 2

    @property
    def name(self) -> str:
        return f"{self.tokens // 1024}K P={self.world}"

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, self.tokens], dtype=torch.int32)

    def local_tokens(self) -> int:
        return zigzag_layout(self.cu_seqlens, self.world).total_local

    def kv_bytes_fwd(self) -> int:
        """K and V of one rank's rows: what one forward ring step sends."""
        return 2 * self.local_tokens() * self.hkv * self.d * self.elem_bytes

    def kv_bytes_bwd(self) -> int:
        """A backward step sends the block and the fp32 dK/dV accumulators travelling with it."""
        return self.kv_bytes_fwd() + 2 * self.local_tokens() * self.hkv * self.d * 4

    def pairs(self, kind: str) -> int:
        """Query-key pairs one block of ``kind`` computes (padding included)."""
        c = zigzag_layout(self.cu_seqlens, self.world).chunk
        if kind == "diag":
            return int((2 * c * (2 * c + 1) // 2).sum())
        return int((2 * c * c).sum())

    def flops(self, kind: str, backward: bool = False) -> float:
        return 4.0 * self.pairs(kind) * self.hq * self.d * (2.5 if backward else 1.0)


def kind_of(rank: int, step: int, world: int) -> str:
    src = (rank - step) % world
    return "diag" if src == rank else ("before" if src < rank else "after")


def predict_ring(case: RingCase, block_ms: dict[str, float], comm_ms: float) -> dict:
    """The ring's schedule from per-kind block times and one step's transfer time:
    slowest step, per-rank balance (max/mean of the ranks' totals), predicted time and
    efficiency (a perfect split of the compute over the ranks, over the prediction)."""
    p = case.world
    table = [[block_ms[kind_of(r, i, p)] for i in range(p)] for r in range(p)]  # (rank, step) ms
    per_step = [max(table[r][i] for r in range(p)) for i in range(p)]
    ring_ms = sum(max(t, comm_ms if i + 1 < p else 0.0) for i, t in enumerate(per_step))
    rank_totals = [sum(row) for row in table]
    mean = sum(rank_totals) / p
    return {"step_ms": max(per_step), "balance": max(rank_totals) / mean, "ring_ms": ring_ms,
            "efficiency": mean / ring_ms}


@dataclass(frozen=True)
class Links:
    """Bandwidth per GPU and direction in GB/s: NVLink inside a node (H100: 900 GB/s both
    ways), InfiniBand between nodes (one 400 Gb/s NIC per GPU: 50 GB/s)."""

    intra_gbps: float = 450.0
    inter_gbps: float = 50.0
    gpus_per_node: int = 8


def kv_heads_attended(num_kv_heads: int, ulysses: int) -> int:
    """KV heads a Ulysses group carries: U of them when U exceeds the model's (replicated)."""
    return max(num_kv_heads, ulysses)


def _shapes(tokens: int, cp: int, ulysses: int, hq: int, hkv: int):
    if cp % ulysses or hq % ulysses:
        raise ValueError(f"ulysses {ulysses} must divide cp {cp} and the {hq} query heads")
    ring = cp // ulysses
    local = zigzag_layout(torch.tensor([0, tokens], dtype=torch.int32), cp).total_local
    return ring, local, kv_heads_attended(hkv, ulysses)


def cp_layer_bytes(tokens: int, cp: int, ulysses: int = 1, *, hq: int = 40, hkv: int = 8, d: int = 128,
                   elem_bytes: int = 2, backward: bool = False) -> dict[str, float]:
    """Bytes one rank sends for one layer's attention over ``cp`` ranks with Ulysses
    degree ``ulysses``: ``ring`` (ring - 1 K/V blocks; the backward's carry fp32 dK/dV
    too) and ``all_to_all`` (q, k, v in, the output back; the backward the same again)."""
    ring, local, kv_heads = _shapes(tokens, cp, ulysses, hq, hkv)
    kv_elems = 2 * local * kv_heads * d  # K and V: this rank's share of a group's rows and heads
    ring_bytes = (ring - 1) * kv_elems * (elem_bytes + (4 if backward else 0))
    a2a = 0.0
    if ulysses > 1:
        a2a = (ulysses - 1) / ulysses * local * (2 * hq + 2 * kv_heads) * d * elem_bytes
        a2a *= 2 if backward else 1
    return {"ring": float(ring_bytes), "all_to_all": float(a2a), "total": float(ring_bytes + a2a)}


def estimate_block_ms(case: RingCase, tflops: float, backward: bool = False) -> dict[str, float]:
    """Block times from FLOPs at ``tflops`` (a stand-in where no GPU measured them)."""
    return {kind: case.flops(kind, backward) / (tflops * 1e12) * 1e3 for kind in KINDS}


def predict_cp_layer(tokens: int, cp: int, ulysses: int, block_ms, links: Links = Links(), *, hq: int = 40,
                     hkv: int = 8, d: int = 128, elem_bytes: int = 2, backward: bool = False) -> dict:
    """Predicted time of one layer's attention (forward, or backward) over ``cp`` ranks.

    ``block_ms(case) -> {kind: ms}`` gives the block times of a ``RingCase`` (measured on a
    GPU, or ``estimate_block_ms``); the case is the ring's: ``cp / ulysses`` ranks, heads
    split ``ulysses`` ways. Returns the ring's and the all-to-alls' ms, their total, the
    bytes, and the efficiency against the whole attention on one GPU split perfectly."""
    ring, local, kv_heads = _shapes(tokens, cp, ulysses, hq, hkv)
    case = RingCase(tokens, ring, hq=hq // ulysses, hkv=kv_heads // ulysses, d=d, elem_bytes=elem_bytes)
    blocks = block_ms(case)
    nbytes = cp_layer_bytes(tokens, cp, ulysses, hq=hq, hkv=hkv, d=d, elem_bytes=elem_bytes, backward=backward)
    # a ring hop crosses a node when the ring's ranks (U apart) do not all fit in one
    ring_gbps = links.intra_gbps if ring * ulysses <= links.gpus_per_node else links.inter_gbps
    step_bytes = nbytes["ring"] / (ring - 1) if ring > 1 else 0.0
    sched = predict_ring(case, blocks, step_bytes / (ring_gbps * 1e9) * 1e3) if ring > 1 else {
        "ring_ms": blocks["diag"], "balance": 1.0, "efficiency": 1.0}
    a2a_gbps = links.intra_gbps if ulysses <= links.gpus_per_node else links.inter_gbps
    a2a_ms = nbytes["all_to_all"] / (a2a_gbps * 1e9) * 1e3
    # the compute split perfectly: a rank's mean share of the blocks (its head shard)
    ideal = sched["efficiency"] * sched["ring_ms"] if ring > 1 else blocks["diag"]
    total = sched["ring_ms"] + a2a_ms
    return {"ring": ring, "ulysses": ulysses, "ring_ms": sched["ring_ms"], "all_to_all_ms": a2a_ms,
            "total_ms": total, "ring_bytes": nbytes["ring"], "all_to_all_bytes": nbytes["all_to_all"],
            "balance": sched["balance"], "efficiency": ideal / total}
