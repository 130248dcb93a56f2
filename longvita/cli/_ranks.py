"""Process groups for the commands that run under torchrun (generate, train, eval niah),
set up in one place: alone, nothing is initialised; under torchrun every rank joins one
group (NCCL for CUDA tensors, gloo for CPU tensors even on a machine with CUDA), each
rank computes on ``cuda:LOCAL_RANK`` when the device is ``cuda``, collectives give up
after ``--timeout`` seconds (torch's default is 30 minutes), and the group is torn down
when the command ends, however it ends."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

from longvita.cli.checks import DEFAULT_TIMEOUT_S
from longvita.cli.errors import UsageError
from longvita.common import LongVITAError

__all__ = ["RankFailure", "Ranks", "add_rank_flags", "ranks", "world_size"]


class RankFailure(LongVITAError, RuntimeError):
    """A collective failed or timed out: another rank stalled, died or hit an error."""


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the world size, and the device it computes on."""

    rank: int
    world: int
    device: str


def add_rank_flags(parser, dtypes: tuple[str, ...] | None = None) -> None:
    """The flags every command run under torchrun takes: where it computes (and in which
    dtype, when given) and how long a rank waits for the others."""
    if dtypes is not None:
        parser.add_argument("--dtype", choices=dtypes, default=dtypes[0], help="weights and activations")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others before failing")


def world_size() -> int:
    """The number of processes torchrun started (1 alone), read before torch is imported."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()  # gloo reports timeouts and lost peers as plain RuntimeErrors
    return isinstance(exc, RuntimeError) and any(w in text for w in ("timed out", "timeout", "connection closed by peer",
                                                                     "connection reset by peer"))


@contextmanager
def ranks(device: str, timeout_s: int) -> Iterator[Ranks]:
    """The process group of this command (see the module docstring); yields ``Ranks``."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    world = world_size()
    if world <= 1:
        yield Ranks(0, 1, device)
        return
    import torch.distributed as dist

    if device == "cuda":  # one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
    except Exception as exc:
        if isinstance(exc, LongVITAError) or not _is_collective_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankFailure(f"rank {dist.get_rank()}: a collective failed after waiting up to --timeout {timeout_s} s "
                          f"(another rank stalled, died or failed): {first[:200]}") from None
    finally:
        dist.destroy_process_group()
