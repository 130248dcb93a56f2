"""The device mesh built from validated parallel degrees (``dims.ParallelDims``).

A world of W ranks is a (dp, cp) grid: consecutive blocks of ``cp`` ranks are the
context-parallel groups (one packed sequence each), and the ranks ``r, r+cp, ...`` are the
data-parallel groups (one sequence per CP group). Inside a CP group of C = R x U ranks,
Ulysses groups are U consecutive ranks (an all-to-all over heads, for the fast link) and
the R ranks with the same place in their Ulysses group form a zigzag ring
(``parallel.ulysses``); U = 1 is the plain ring. Parameters are sharded by FSDP2 over every
rank when dp > 1 (the 1-D ``fsdp`` mesh), and replicated when the world is one CP group
(gradients are then summed over it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from longvita.parallel.dims import ParallelConfigError, ParallelDims

__all__ = ["CPGroups", "Mesh", "ParallelConfigError", "ParallelDims", "build_mesh"]


@dataclass(frozen=True)
class CPGroups:
    """One context-parallel group of C = R x U ranks: ``group`` all C of them (gradient sums,
    the sharded KV cache), ``ring`` the R ranks this rank rings with, ``ulysses`` the U ranks
    it exchanges heads with. ``ulysses_rank`` is its place in the Ulysses group, ``ring_rank``
    its ring position. Alone (or from a plain process group) U = 1 and ring = group."""

    group: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    ulysses: dist.ProcessGroup | None
    ulysses_degree: int = 1

    @classmethod
    def of(cls, cp) -> "CPGroups":
        """``cp``: a CPGroups, a plain process group (a ring over all of it) or None (the
        default group when torch.distributed is initialised, else one process)."""
        return cp if isinstance(cp, CPGroups) else cls(cp, cp, None, 1)

    @property
    def ulysses_rank(self) -> int:
        return dist.get_rank(self.ulysses) if self.ulysses_degree > 1 else 0

    @property
    def ring_rank(self) -> int:
        from longvita.parallel.groups import rank_world

        return rank_world(self.ring)[0]


@dataclass(frozen=True)
class Mesh:
    """This rank's groups: ``cp`` (its context-parallel group: ``CPGroups``), ``dp_group``
    (the ranks holding the same shard of other sequences), ``fsdp`` (the 1-D DeviceMesh
    FSDP2 shards over, or None when parameters are replicated) and ``dp_index`` (which
    sequence of a step this rank's CP group trains on)."""

    dims: ParallelDims
    cp: CPGroups
    dp_group: dist.ProcessGroup | None
    fsdp: object | None
    dp_index: int

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.cp.group


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    """The process groups of this rank for ``dims`` (torch.distributed must be initialised
    when the world has more than one rank). Every rank calls it: creating groups is collective."""
    if dims.world == 1:
        return Mesh(dims, CPGroups(None, None, None, 1), None, None, 0)
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world:
        raise ParallelConfigError(f"ParallelDims has world {dims.world} but torch.distributed has {dist.get_world_size()} ranks")
    grid = init_device_mesh(device_type, (dims.dp, dims.cp), mesh_dim_names=("dp", "cp"))
    cp_group = grid["cp"].get_group()
    if dims.ulysses > 1:
        split = init_device_mesh(device_type, (dims.dp, dims.ring, dims.ulysses),
                                 mesh_dim_names=("dp", "ring", "ulysses"))
        groups = CPGroups(cp_group, split["ring"].get_group(), split["ulysses"].get_group(), dims.ulysses)
    else:
        groups = CPGroups(cp_group, cp_group, None, 1)
    # FSDP2 shards over every rank (data and context parallel together): a 1-D mesh of
    # the world (flattening the grid would need DeviceMesh's private _flatten)
    fsdp = init_device_mesh(device_type, (dims.world,), mesh_dim_names=("fsdp",)) if dims.fsdp else None
    return Mesh(dims, groups, grid["dp"].get_group(), fsdp, grid["dp"].get_local_rank())
