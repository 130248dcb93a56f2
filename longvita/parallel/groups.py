"""Process-group helpers every parallel piece shares: this rank and the group's size, and
a broadcast from a rank of a sub-group. ``group=None`` means the default group when
torch.distributed is initialised, else one process alone (rank 0 of 1), so every parallel
code path also runs, unchanged, in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["broadcast_from", "is_distributed", "rank_world"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank in ``group``, size of ``group``); (0, 1) without torch.distributed. A group
    given while torch.distributed is not initialised is a caller's mistake: ValueError."""
    if not is_distributed():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def broadcast_from(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Broadcast ``tensor`` in place from rank ``src`` of ``group`` (a group-local rank; the
    collective wants the global one). A no-op alone."""
    if rank_world(group)[1] > 1:
        pg = group if group is not None else dist.group.WORLD
        dist.broadcast(tensor, src=dist.get_global_rank(pg, src), group=group)
    return tensor
