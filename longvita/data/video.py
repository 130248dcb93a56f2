"""Video decoding into Long-VITA frame tiles.

Frame selection, precisely: the video stream's frame timestamps are read from the
demuxed packets (cheap: no decoding), sorted, and taken relative to the first one
(a stream without timestamps, such as raw .h264, uses frame index / frame rate).
Time is cut into buckets of ``1/max_fps`` seconds and the first frame of each
non-empty bucket is kept, so at most ``max_fps`` frames per second survive and a
video slower than ``max_fps`` keeps every frame. If more than ``max_frames`` remain,
``max_frames`` of them are taken uniformly (``linspace(0, n-1, max_frames)`` rounded,
so the first and last survivors are always kept). Only the selected frames are
converted; each is padded to square with its mean colour, resized bicubic to one tile
and ImageNet-normalised exactly like an image's thumbnail.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from longvita.data.errors import InputError
from longvita.data.image import square_tile

__all__ = ["load_video", "select_frames"]


def select_frames(timestamps: list[float | Fraction], *, max_fps: float = 1.0, max_frames: int = 4096) -> list[int]:
    """Indices into ``timestamps`` (seconds, in presentation order) of the frames kept:
    the first frame of every ``1/max_fps``-second bucket, then uniformly at most
    ``max_frames`` of those. Pure function so the rule can be tested without a codec."""
    if max_fps <= 0:
        raise ValueError(f"max_fps must be positive, got {max_fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not timestamps:
        return []
    fps = Fraction(max_fps)  # exact arithmetic: a frame at exactly k/max_fps opens bucket k
    t0 = Fraction(timestamps[0])
    kept, last_bucket = [], None
    for i, t in enumerate(timestamps):
        bucket = math.floor((Fraction(t) - t0) * fps)
        if bucket != last_bucket:
            kept.append(i)
            last_bucket = bucket
    if len(kept) > max_frames:
        picks = np.linspace(0, len(kept) - 1, max_frames).round().astype(np.int64)
        kept = [kept[p] for p in picks]
    return kept


def _import_av(path: Path):
    """PyAV, imported on first use: it is optional (``pip install 'longvita[video]'``),
    so nothing else in longvita may import it at import time."""
    try:
        import av
    except ImportError:
        raise InputError(
            f"video file {str(path)!r}: decoding video needs PyAV, which is not installed: "
            "pip install 'longvita[video]' (or pip install av)"
        ) from None
    return av


def _open(path: Path):
    av = _import_av(path)

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"video file {str(path)!r} is corrupt or not a video: {exc}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"video file {str(path)!r} has no video stream")
    return container


def load_video(
    path: str | Path,
    *,
    max_frames: int = 4096,
    max_fps: float = 1.0,
    image_size: int = 448,
) -> torch.Tensor:
    """Decode a video into frame tiles: float32 ``(F, 3, image_size, image_size)`` with
    ``1 <= F <= max_frames`` and at most ``max_fps`` frames per second of video (see the
    module docstring for the exact rule).

    Raises InputError naming the file if it is missing, has no video stream, cannot be
    decoded, or yields no frames; without PyAV, an InputError saying how to install it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"video file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"video path {str(path)!r} is not a file")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    select_frames([], max_fps=max_fps, max_frames=max_frames)  # validate options before I/O
    av = _import_av(path)  # after the argument checks: a missing file is reported as such

    # Pass 1: presentation timestamps from packets only (no decoding), to choose frames
    # before paying for any pixel conversion. Raw elementary streams (e.g. .h264) carry
    # no timestamps: then frames are keyed by their output index at the stream's rate.
    container = _open(path)
    try:
        stream = container.streams.video[0]
        time_base = stream.time_base
        rate = stream.guessed_rate or stream.average_rate  # guessed: FFmpeg's best estimate
        try:
            pts = [p.pts for p in container.demux(stream) if p.size > 0]
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"video file {str(path)!r} is corrupt: {exc}") from None
    finally:
        container.close()
    by_index = any(t is None for t in pts) or time_base is None
    if by_index:
        if not rate:
            raise InputError(f"video file {str(path)!r} has neither frame timestamps nor a frame rate")
        keys = list(range(len(pts)))
        times = [Fraction(i) / Fraction(rate) for i in keys]
    else:
        keys = sorted(pts)
        times = [t * time_base for t in keys]
    if not keys:
        raise InputError(f"video file {str(path)!r} contains no video frames")
    wanted = {keys[i] for i in select_frames(times, max_fps=max_fps, max_frames=max_frames)}

    # Pass 2: decode and keep the chosen frames (decoding must run through every frame:
    # inter-coded frames depend on earlier ones). Decoded frames come out in
    # presentation order and carry their packet's pts.
    from tqdm.auto import tqdm

    frames: dict[int, torch.Tensor] = {}
    container = _open(path)
    # long videos take minutes to decode: show progress (stderr), not for short clips
    progress = tqdm(total=len(keys), desc=f"decoding {path.name}", unit="frame", disable=len(keys) < 2000, leave=False)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                progress.update()
                key = index if by_index else frame.pts
                if key in wanted and key not in frames:
                    frames[key] = square_tile(frame.to_image(), image_size)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"video file {str(path)!r} is corrupt: {exc}") from None
    finally:
        progress.close()
        container.close()
    if not frames:
        raise InputError(f"video file {str(path)!r} decoded to no frames")
    # Frames whose packets could not be decoded are dropped rather than invented.
    return torch.stack([frames[p] for p in sorted(frames)])
