"""Distributed runtime: zigzag sharding and ring attention (context parallelism)."""

from longvita.dist.ring_attention import RingComm, ring_attention
from longvita.dist.zigzag import (
    ZigzagLayout,
    visible_pairs_per_rank,
    zigzag_layout,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "RingComm", "ZigzagLayout", "ring_attention",
    "visible_pairs_per_rank",
    "zigzag_layout", "zigzag_shard", "zigzag_unshard",
]
