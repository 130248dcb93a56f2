"""Context parallelism over torch.distributed, applied to a plain model from outside:
zigzag sharding (``zigzag``), ring attention (``ring``), one rank's shard of a sequence
(``shard.CPShard``), the model's attention for a split sequence (``plans``), and parallel
degrees with their device mesh (``mesh``). Imports ``model`` and ``kernels``; the model
never imports this package."""

from longvita.parallel.groups import rank_world
from longvita.parallel.mesh import Mesh, ParallelConfigError, ParallelDims
from longvita.parallel.plans import RingCausalAttention, RingPrefillAttention, ShardedDecodeAttention, ShardedKVCache
from longvita.parallel.ring import RingComm, ring_attention
from longvita.parallel.shard import CPShard
from longvita.parallel.zigzag import (
    ZigzagLayout,
    visible_pairs_per_rank,
    zigzag_layout,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "CPShard", "Mesh", "ParallelConfigError", "ParallelDims", "RingCausalAttention", "RingComm",
    "RingPrefillAttention", "ShardedDecodeAttention", "ShardedKVCache", "ZigzagLayout", "rank_world",
    "ring_attention", "visible_pairs_per_rank", "zigzag_layout", "zigzag_shard", "zigzag_unshard",
]
