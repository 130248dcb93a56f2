"""Run a function on P gloo ranks (CPU processes) and bring back what each rank returned.

Tests that need a process group call ``run_on_ranks(fn, world, tmp_path, *args)``: every
rank joins one gloo group, runs ``fn(rank, world, *args)`` and saves its result; a rank's
traceback comes back as the assertion message; a hang fails after ``deadline_s``. The
assertions are made in the parent, on the returned list (one entry per rank)."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, out_dir, fn, args):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=90))
        torch.set_num_threads(1)  # P processes share the machine's cores
        result = fn(rank, world, *args)
        dist.barrier()
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # the parent sees a whole file or none
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world: int, tmp_path, *args, deadline_s: float = 180):
    """``fn`` must be a module-level function (it is pickled into spawned processes)."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path / "init"), str(tmp_path), fn, args), nprocs=world,
                             join=False, start_method="spawn")
    try:
        t0 = time.monotonic()
        while True:
            try:
                if ctx.join(timeout=1):
                    break
            except mp.ProcessExitedException:
                # a rank killed by a signal AFTER every rank saved its result (past the
                # barrier: gloo's threads can abort at process exit) still returned all its
                # numbers; one killed before that fails the test below
                if all((tmp_path / f"rank{r}.pt").exists() for r in range(world)):
                    break
                raise
            if time.monotonic() - t0 > deadline_s:
                pytest.fail(f"{fn.__name__} on {world} ranks did not finish in {deadline_s}s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    for r in range(world):
        err = tmp_path / f"rank{r}.err"
        assert not err.exists(), err.read_text()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def write_mp4(path, n_frames: int, fps: int, seed: int, width: int = 64, height: int = 48, faststart: bool = False):
    """A real mp4 (mpeg4, yuv420p) of random frames, encoded by PyAV (import it first)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}  # index at the front
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(n_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
