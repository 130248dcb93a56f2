"""Parallel degrees, validated up front with errors that name every factor (torchtitan's
``ParallelDims``). Standard library only: the command line checks its flags with it before
torch loads; ``ParallelDims.build`` makes the device mesh (``mesh.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from longvita.common import LongVITAError

__all__ = ["ParallelConfigError", "ParallelDims"]


class ParallelConfigError(LongVITAError, ValueError):
    """Parallel degrees that do not fit the world or the model (the message names every factor)."""


@dataclass(frozen=True)
class ParallelDims:
    """world = dp x cp ranks, cp = ring x ulysses. ``cp=None`` at ``of`` means every rank is
    one context-parallel group."""

    world: int
    cp: int
    ulysses: int = 1

    @classmethod
    def of(cls, world: int, cp: int | None = None, ulysses: int = 1) -> "ParallelDims":
        cp = world if cp is None else cp
        if not isinstance(world, int) or world < 1:
            raise ParallelConfigError(f"the world size must be a positive int, got {world!r}")
        if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1 or world % cp:
            raise ParallelConfigError(
                f"--cp {cp} must divide the number of processes ({world}): world = dp x cp with dp = world / cp"
            )
        if not isinstance(ulysses, int) or isinstance(ulysses, bool) or ulysses < 1 or cp % ulysses:
            raise ParallelConfigError(
                f"--ulysses {ulysses} must divide --cp {cp}: cp = ring x ulysses with a ring of cp / ulysses ranks"
            )
        return cls(world, cp, ulysses)

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def fsdp(self) -> bool:
        """Whether parameters are sharded: whenever there is more than one rank, over all of
        them (data- and context-parallel alike, as torchtitan's dp_shard x cp): a 14B model's
        fp32 weights, gradients and AdamW moments (240 GB) fit no GPU whole, whatever the
        context parallelism does for the activations."""
        return self.world > 1

    def build(self, device_type: str):
        """This rank's ``parallel.mesh.Mesh`` (see ``build_mesh``)."""
        from longvita.parallel.mesh import build_mesh

        return build_mesh(self, device_type)
