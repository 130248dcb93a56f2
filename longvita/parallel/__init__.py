"""Context parallelism over torch.distributed, applied to a plain model from outside:
zigzag sharding (``zigzag``), ring attention (``ring``), Ulysses inside the ring
(``ulysses``), one rank's shard of a sequence (``shard.CPShard``), the model's attention for
a split sequence (``plans``), parallel degrees (``dims``, standard library only) and the
device mesh built from them (``mesh``). Imports ``model`` and ``kernels``; the model never
imports this package.

The names below load lazily, so that ``longvita.parallel.dims`` is importable before torch
(the command line checks its flags with it)."""

_WHERE = {
    "rank_world": "groups",
    "ParallelConfigError": "dims", "ParallelDims": "dims",
    "CPGroups": "mesh", "Mesh": "mesh", "build_mesh": "mesh",
    "ChunkPrefillAttention": "plans", "PrefillCacheAttention": "plans", "RingCausalAttention": "plans",
    "ShardedDecodeAttention": "plans", "ShardedKVCache": "plans",
    "RingComm": "ring", "ring_attention": "ring", "ring_block": "ring",
    "CPShard": "shard",
    "UlyssesRingAttention": "ulysses", "check_ulysses_heads": "ulysses", "hybrid_attention": "ulysses",
    "ZigzagLayout": "zigzag", "visible_pairs_per_rank": "zigzag", "zigzag_layout": "zigzag",
    "zigzag_shard": "zigzag", "zigzag_unshard": "zigzag",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"longvita.parallel.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'longvita.parallel' has no attribute {name!r}")
