"""NIAH haystacks and the visual haystack's feature cache.

Text: token ids of the given text files (or generated filler). Visual: frames at 1 fps
from a folder of videos (or generated frames), as uint8 tiles. The visual haystack's
frame features are computed once, in bounded chunks, and cached on disk under
``out/cache``, keyed by the frames' source, indices, preprocessing and a fingerprint of
the vision weights, so every cell of the grid (and a resumed run) reuses them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from longvita.data.errors import InputError
from longvita.data.video import frame_tile
from longvita.eval.niah.needles import filler_text, synthetic_haystack_frames
from longvita.files import write_atomic
from longvita.parallel import rank_world

__all__ = ["TextHaystack", "VideoHaystack", "cached_frame_features", "frame_features", "weights_fingerprint"]

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")
TEXT_SUFFIXES = (".txt", ".md")


def haystack_files(path, suffixes: tuple[str, ...]) -> list[Path]:
    """One file, or a folder's files with these suffixes in name order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(f"--haystack {str(p)!r} does not exist")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"--haystack folder {str(p)!r} holds no {' or '.join(suffixes)} files")
    return files


def weights_fingerprint(modules) -> str:
    """A short hash of the named parameters of ``modules``: each tensor's name, shape and the
    sums of a strided sample of at most 65,536 of its values and of their magnitudes. Two
    different trainings or seeds differ in it; a 14B model costs no copy of itself."""
    h = hashlib.sha256()
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 65536)].double()
                h.update(f"{name}:{tuple(p.shape)}:{sample.sum().item():.10e}:{sample.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


class TextHaystack:
    """Token ids of a text haystack: the files of a folder (sorted, ``.txt``/``.md``), one
    file, or generated filler (``path=None``). ``source`` names it."""

    def __init__(self, tokenizer, path: str | os.PathLike | None, seed: int = 0, min_tokens: int = 0):
        if path is None:
            text, self.source = filler_text(max(1000, min_tokens), seed), f"filler(seed={seed})"
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            while len(ids) < min_tokens:  # filler runs ~1.3 tokens a word: top up if short
                text += " " + filler_text(min_tokens - len(ids) + 100, seed + len(ids))
                ids = tokenizer.encode(text, add_special_tokens=False).ids
        else:
            files = haystack_files(path, TEXT_SUFFIXES)
            parts = []
            for f in files:
                try:
                    parts.append(f.read_text(encoding="utf-8"))
                except UnicodeDecodeError as exc:
                    raise InputError(f"--haystack {str(f)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
            ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False).ids
            self.source = ",".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
        self.identity = self.source  # what the table records: the same for any grid length
        self.ids = torch.tensor(ids, dtype=torch.long)


class VideoHaystack:
    """Frames at 1 fps from the videos of a folder (sorted, read in turn until enough
    frames), one video file, or generated frames (``path=None``). Frames are uint8 tiles."""

    def __init__(self, path: str | os.PathLike | None, n_frames: int, image_size: int, preprocess: str, seed: int = 0):
        self.image_size, self.preprocess = image_size, preprocess
        if path is None:
            frames = synthetic_haystack_frames(n_frames, image_size, seed)
            self.tiles = torch.stack([frame_tile(f, image_size, preprocess, raw=True) for f in frames])
            self.key_parts = [f"synthetic:{seed}:{n_frames}"]
            self.identity = f"synthetic:{seed}"  # what the table records: the same for any grid length
            return
        from longvita.data.video import read_video

        p = Path(path)
        files = haystack_files(p, VIDEO_SUFFIXES)
        chunks, parts, have = [], [], 0
        for f in files:
            if have >= n_frames:
                break
            video = read_video(f, max_frames=n_frames - have, max_fps=1.0, image_size=image_size,
                               preprocess=preprocess, raw=True)
            chunks.append(video.pixel_values)
            have += video.pixel_values.shape[0]
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}:{video.indices[0]}-{video.indices[-1]}")
        self.tiles = torch.cat(chunks)
        if self.tiles.shape[0] < n_frames:
            raise InputError(f"--haystack {str(p)!r} gives {self.tiles.shape[0]} frames at 1 fps; the grid needs {n_frames}")
        self.key_parts = parts
        # what the table records: the haystack's files, not how many frames this grid reads
        self.identity = ",".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)

    def cache_key(self, model) -> str:
        """Source, frames, preprocessing and a fingerprint of the vision weights."""
        h = hashlib.sha256()
        for part in self.key_parts + [self.preprocess, str(self.image_size), str(self.tiles.shape[0]),
                                      weights_fingerprint([model.vision, model.projector])]:
            h.update(part.encode())
        return h.hexdigest()[:16]


def frame_features(model, tiles: torch.Tensor, chunk: int = 16, progress: Callable | None = None) -> torch.Tensor:
    """(F, tokens_per_tile, hidden) projected features of uint8 tiles, ``chunk`` tiles at
    a time (a 4,096-frame haystack is never encoded at once). On the model's device and
    dtype, returned on the CPU."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, tiles.shape[0], chunk):
            emb = model.image_embeddings(tiles[s:s + chunk].to(device))
            out.append(emb.view(min(chunk, tiles.shape[0] - s), -1, emb.shape[-1]).cpu())
            if progress is not None:
                progress(min(chunk, tiles.shape[0] - s))
    return torch.cat(out)


def cached_frame_features(model, haystack: VideoHaystack, cache_dir: Path, group=None,
                          chunk: int = 16, progress: Callable | None = None) -> tuple[torch.Tensor, bool]:
    """The haystack's frame features from ``cache_dir`` (computed and saved by rank 0 if
    missing; the other ranks wait and read). Returns (features, was_cached)."""
    from safetensors.torch import load_file, save_file

    rank, world = rank_world(group)
    path = cache_dir / f"frames-{haystack.cache_key(model)}.safetensors"
    was_cached = path.exists()
    if not was_cached and rank == 0:
        feats = frame_features(model, haystack.tiles, chunk, progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file({"features": feats.contiguous()}, str(tmp)))
    if world > 1:
        dist.barrier(group=group)
    return load_file(str(path))["features"], was_cached
