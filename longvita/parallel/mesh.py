"""Parallel degrees, validated up front, and the device mesh built from them (as
torchtitan's ``ParallelDims``).

A world of W ranks is a (dp, cp) grid: consecutive blocks of ``cp`` ranks are the
context-parallel groups (one packed sequence each, zigzag-sharded), and the ranks
``r, r+cp, ...`` are the data-parallel groups (one sequence per CP group). Parameters are
sharded by FSDP2 over every rank when dp > 1 (the 1-D ``fsdp`` mesh), and replicated when
the world is one CP group (gradients are then summed over it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from longvita.common import LongVITAError

__all__ = ["Mesh", "ParallelConfigError", "ParallelDims"]


class ParallelConfigError(LongVITAError, ValueError):
    """Parallel degrees that do not fit the world (the message names every factor)."""


@dataclass(frozen=True)
class ParallelDims:
    """world = dp * cp ranks. ``cp=None`` means every rank is one context-parallel group."""

    world: int
    cp: int

    @classmethod
    def of(cls, world: int, cp: int | None = None) -> "ParallelDims":
        cp = world if cp is None else cp
        if not isinstance(world, int) or world < 1:
            raise ParallelConfigError(f"the world size must be a positive int, got {world!r}")
        if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1 or world % cp:
            raise ParallelConfigError(
                f"--cp {cp} must divide the number of processes ({world}): world = dp x cp with dp = world / cp"
            )
        return cls(world, cp)

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def fsdp(self) -> bool:
        """Whether parameters are sharded (more than one data-parallel group)."""
        return self.dp > 1

    def build(self, device_type: str) -> "Mesh":
        """The process groups of this rank (torch.distributed must be initialised when the
        world has more than one rank). Every rank calls it: creating groups is collective."""
        if self.world == 1:
            return Mesh(self, None, None, None, 0)
        from torch.distributed.device_mesh import init_device_mesh

        if dist.get_world_size() != self.world:
            raise ParallelConfigError(f"ParallelDims has world {self.world} but torch.distributed has {dist.get_world_size()} ranks")
        grid = init_device_mesh(device_type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        # FSDP2 shards over every rank (data and context parallel together): a 1-D mesh of
        # the world (flattening the grid would need DeviceMesh's private _flatten)
        fsdp = init_device_mesh(device_type, (self.world,), mesh_dim_names=("fsdp",)) if self.fsdp else None
        return Mesh(self, grid["cp"].get_group(), grid["dp"].get_group(), fsdp, grid["dp"].get_local_rank())


@dataclass(frozen=True)
class Mesh:
    """This rank's groups: ``cp_group`` (its context-parallel group), ``dp_group`` (the
    ranks holding the same shard of other sequences), ``fsdp`` (the 1-D DeviceMesh FSDP2
    shards over, or None when parameters are replicated) and ``dp_index`` (which
    sequence of a step this rank's CP group trains on). All None / 0 alone."""

    dims: ParallelDims
    cp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    fsdp: object | None
    dp_index: int
