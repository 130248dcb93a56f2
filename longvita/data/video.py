"""Video decoding into frame tiles, following the checkpoint's preprocessing family.

Frame numbering: frames are counted in presentation order from the demuxed packets'
timestamps (cheap: no decoding); ``n_frames`` is how many the file holds and ``fps`` the
stream's average frame rate (FFmpeg's ``avg_frame_rate``, what decord's
``get_avg_fps`` reports, which Long-VITA's loader uses). A stream without timestamps (raw
.h264) numbers frames in decoding output order and uses FFmpeg's guessed rate: its
average rate is only the demuxer's default (25).

Which frames (pure functions of ``n_frames`` and ``fps``, so the rules are testable
without a codec):

- ``long-vita`` (Long-VITA's ``ImageProcessor.get_video_frames``):
  ``step = max(fps / max_fps, n_frames / (max_frames + 1))`` and frame ``int(i * step)``
  for ``i = 0 .. max_frames-1`` while it is ``< n_frames``. At most ``max_fps`` frames per
  second and ``max_frames`` frames; a video slower than ``max_fps`` repeats frames, as
  Long-VITA's own loader does.
- ``internvl`` (transformers' ``InternVLVideoProcessor.sample_frames`` asked for
  ``fps=max_fps``, with InternVL's centred segments): ``num = int(n_frames / fps *
  max_fps)`` clamped to ``1 .. min(max_frames, n_frames)``, and the frames
  ``torch.arange(n/num/2, n, n/num).int()``: the middle frame of each of ``num`` equal
  segments.

Pixels of each frame:

- ``long-vita``: padded to square, centred, on the ImageNet mean colour
  ``(123, 116, 103)``, resized bicubic to one tile, ImageNet-normalised (Long-VITA's
  ``process_images``);
- ``internvl``: squashed (bicubic resize to one tile, no padding), ImageNet-normalised
  (InternVL's chat ``load_video``: ``dynamic_preprocess(max_num=1)``).

A file that holds fewer frames than its header declares (cut short), or whose selected
frames cannot all be decoded, is used as far as it goes, with one ``VideoWarning`` naming
the file and the frame counts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from longvita.data.errors import InputError
from longvita.data.image import (
    DEFAULT_PREPROCESS,
    IMAGENET_MEAN_RGB,
    LONG_VITA,
    check_preprocess,
    pad_to_square,
    normalize,
    squash_tile,
    to_uint8,
)

__all__ = [
    "VideoFrames",
    "VideoWarning",
    "frame_indices",
    "frame_tile",
    "internvl_frame_indices",
    "load_video",
    "long_vita_frame_indices",
    "read_video",
]


class VideoWarning(UserWarning):
    """A video was usable only in part (cut short, or undecodable packets)."""


def _check_sampling(n_frames: int, fps: float, max_fps: float, max_frames: int) -> None:
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not max_fps > 0:
        raise ValueError(f"max_fps must be positive, got {max_fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")


def long_vita_frame_indices(n_frames: int, fps: float, *, max_fps: float = 1.0, max_frames: int = 4096) -> list[int]:
    """Long-VITA's frame choice (see the module docstring); may repeat a frame."""
    _check_sampling(n_frames, fps, max_fps, max_frames)
    step = max(fps / max_fps, n_frames / (max_frames + 1))
    out = []
    for i in range(max_frames):
        k = int(i * step)
        if k >= n_frames:  # step > 0: every later index is out of the video too
            break
        out.append(k)
    return out


def internvl_frame_indices(n_frames: int, fps: float, *, max_fps: float = 1.0, max_frames: int = 4096) -> list[int]:
    """InternVL's centred-segment frame choice (see the module docstring); no repeats."""
    _check_sampling(n_frames, fps, max_fps, max_frames)
    if n_frames == 0:
        return []
    num = min(max(int(n_frames / fps * max_fps), 1), max_frames, n_frames)
    # torch.arange in its default dtype, exactly as transformers computes it, so the
    # truncation to int lands on the same frames
    picks = torch.arange(n_frames / num / 2, n_frames, n_frames / num).int().tolist()
    return [k for k in picks if k < n_frames]


def frame_indices(n_frames: int, fps: float, *, preprocess: str = DEFAULT_PREPROCESS, max_fps: float = 1.0,
                  max_frames: int = 4096) -> list[int]:
    """Frames (presentation-order numbers) the ``preprocess`` family samples."""
    check_preprocess(preprocess)
    rule = long_vita_frame_indices if preprocess == LONG_VITA else internvl_frame_indices
    return rule(n_frames, fps, max_fps=max_fps, max_frames=max_frames)


def frame_tile(image: Image.Image, image_size: int, preprocess: str = DEFAULT_PREPROCESS, *,
               raw: bool = False) -> torch.Tensor:
    """One video frame -> ``(3, S, S)`` tile in the family's way: normalised float32, or
    with ``raw=True`` its uint8 pixels (``normalize`` gives the same float32 tile)."""
    check_preprocess(preprocess)
    if preprocess == LONG_VITA:
        square = pad_to_square(image.convert("RGB"), IMAGENET_MEAN_RGB)
        pixels = to_uint8(square.resize((image_size, image_size), Image.Resampling.BICUBIC))
        return pixels if raw else normalize(pixels)
    return squash_tile(image, image_size, raw=raw)


@dataclass
class VideoFrames:
    """Frame tiles of one video and which frames they are.

    pixel_values: float32 ``(F, 3, S, S)`` (uint8 pixels when read with ``raw=True``),
        one tile per entry of ``indices``.
    indices: presentation-order frame numbers used (a number repeats when the family's
        rule repeats a frame).
    n_frames: frames the file holds (found by demuxing).
    declared_frames: frames its header declares (None when it declares nothing usable).
    fps: the frame rate the rule used.
    """

    pixel_values: torch.Tensor
    indices: list[int] = field(default_factory=list)
    n_frames: int = 0
    declared_frames: int | None = None
    fps: float = 0.0


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


def _header(container, stream) -> tuple[int, float | None]:
    """(frame count the header declares or 0, duration in seconds it declares or None)."""
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    return int(stream.frames or 0), seconds


def _declared_frames(frames: int, seconds: float | None, rate) -> tuple[int | None, int]:
    """(frames the header declares, how many frames that count may be off by)."""
    if frames > 0:  # an exact count (mp4/mov sample tables)
        return frames, 0
    if seconds and rate:
        return round(seconds * float(rate)), 1  # from a duration: allow one frame of rounding
    return None, 0


def read_video(
    path: str | Path,
    *,
    max_frames: int = 4096,
    max_fps: float = 1.0,
    image_size: int = 448,
    preprocess: str = DEFAULT_PREPROCESS,
    raw: bool = False,
) -> VideoFrames:
    """Decode the frames ``preprocess``'s rule selects (see the module docstring).

    ``raw=True`` keeps the tiles as uint8 pixels (a quarter of the memory: 4,096 frames
    of 448² are 2.5 GB instead of 9.9 GB); the vision encoder normalises each chunk of
    tiles on its device, with the same result.

    Raises InputError naming the file if it is missing, has no video stream, cannot be
    decoded, or yields no frames (without PyAV: an InputError saying how to install it);
    warns (``VideoWarning``) when it is usable only in part."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"video file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"video path {str(path)!r} is not a file")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    frame_indices(0, 1.0, preprocess=preprocess, max_fps=max_fps, max_frames=max_frames)  # options, before I/O
    av = _import_av(path)  # after the argument checks: a missing file is reported as such

    # Pass 1: presentation timestamps from packets only (no decoding), to choose frames
    # before paying for any pixel conversion.
    container = _open(path)
    try:
        stream = container.streams.video[0]
        average, guessed = stream.average_rate, stream.guessed_rate
        header = _header(container, stream)
        time_base = stream.time_base  # read while the container is open
        pts = []
        demux_failed = False
        try:
            for p in container.demux(stream):
                if p.size > 0:
                    pts.append(p.pts)
        except (av.FFmpegError, OSError, ValueError):
            demux_failed = True  # damaged past this point: use the packets read so far, warned below
    finally:
        container.close()
    by_index = any(t is None for t in pts) or time_base is None
    rate = (guessed or average) if by_index else (average or guessed)
    declared, slack = _declared_frames(*header, rate)
    keys = list(range(len(pts))) if by_index else sorted(pts)
    if not keys:
        raise InputError(f"video file {str(path)!r} contains no video frames")
    if not rate:
        raise InputError(f"video file {str(path)!r} declares no frame rate")
    n = len(keys)
    indices = frame_indices(n, float(rate), preprocess=preprocess, max_fps=max_fps, max_frames=max_frames)
    wanted = {keys[i]: i for i in indices}
    if declared is not None and n < declared - slack:
        warnings.warn(
            f"video file {str(path)!r}: only {n} of the {declared} frames its header declares are present "
            f"(the file ends early); using {len(indices)} frames sampled from those",
            VideoWarning, stacklevel=2,
        )
    elif demux_failed:
        warnings.warn(
            f"video file {str(path)!r}: unreadable after its first {n} frames; "
            f"using {len(indices)} frames sampled from those",
            VideoWarning, stacklevel=2,
        )

    # Pass 2: decode (every packet: inter-coded frames depend on earlier ones) and keep
    # the chosen frames. Decoded frames come out in presentation order with their pts.
    from tqdm.auto import tqdm

    tiles: dict[int, torch.Tensor] = {}
    bad_packets = 0
    container = _open(path)
    # long videos take minutes to decode: show progress (stderr), not for short clips
    progress = tqdm(total=n, desc=f"decoding {path.name}", unit="frame", disable=n < 2000, leave=False)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        out_index = 0
        try:
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except (av.FFmpegError, ValueError):
                    bad_packets += 1  # one damaged packet: keep going, later ones may decode
                    continue
                for frame in decoded:
                    progress.update()
                    key = out_index if by_index else frame.pts
                    out_index += 1
                    if key in wanted and wanted[key] not in tiles:
                        tiles[wanted[key]] = frame_tile(frame.to_image(), image_size, preprocess, raw=raw)
                if len(tiles) == len(wanted):
                    break
        except (av.FFmpegError, OSError, ValueError):
            bad_packets += 1  # the demuxer gave up: keep what was decoded
    finally:
        progress.close()
        container.close()
    if not tiles:
        raise InputError(f"video file {str(path)!r} decoded to no frames")
    if len(tiles) < len(wanted):
        warnings.warn(
            f"video file {str(path)!r}: decoded {len(tiles)} of the {len(wanted)} frames selected "
            f"({bad_packets} undecodable packet(s)); the rest are left out",
            VideoWarning, stacklevel=2,
        )
    # frames that could not be decoded are dropped rather than invented
    used = [i for i in indices if i in tiles]
    return VideoFrames(torch.stack([tiles[i] for i in used]), used, n, declared, float(rate))


def load_video(
    path: str | Path,
    *,
    max_frames: int = 4096,
    max_fps: float = 1.0,
    image_size: int = 448,
    preprocess: str = DEFAULT_PREPROCESS,
) -> torch.Tensor:
    """Decode a video into frame tiles: float32 ``(F, 3, image_size, image_size)`` with
    ``1 <= F <= max_frames`` and at most ``max_fps`` sampled frames per second of video
    (``read_video`` also returns which frames; see the module docstring for the rules).

    Raises InputError naming the file if it is missing, has no video stream, cannot be
    decoded, or yields no frames."""
    return read_video(path, max_frames=max_frames, max_fps=max_fps, image_size=image_size,
                      preprocess=preprocess).pixel_values
