"""Qwen2 ChatML prompt with each preprocessing family's media token layout.

Prompt (system turn optional)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

``content`` concatenates the segments exactly as given (no separators are added):
text, images and videos in any order. With N = tokens per tile:

``long-vita`` (Long-VITA's layout):

- image: ``<img>`` + N ``<IMG_CONTEXT>`` + ``</img>`` for the thumbnail (or the single
  tile of a 1x1 image), then for each grid row ``\\n`` followed by, per tile,
  ``<patch>`` + N ``<PATCH_CONTEXT>`` + ``</patch>``;
- video: per frame ``<vid>`` + N ``<VID_CONTEXT>`` + ``</vid>``.

``internvl`` (transformers' ``InternVLProcessor``: ``replace_image_token`` /
``replace_video_token``):

- image: ``<img>`` + N * n_tiles ``<IMG_CONTEXT>`` + ``</img>``, one block for all tiles
  (grid tiles row-major, then the thumbnail);
- video: frames joined by ``\\n``, frame i (from 1) as ``Frame{i}: `` + ``<img>`` +
  N ``<IMG_CONTEXT>`` + ``</img>``.

Media ids are emitted directly rather than spelled out in a string and re-tokenised:
every text run is bounded by special tokens, where the tokenizer splits anyway, so the
ids equal those of tokenising the whole prompt string (a test checks this), without
building a string of a million placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from tokenizers import Tokenizer

from longvita.data.errors import InputError
from longvita.data.image import DEFAULT_PREPROCESS, LONG_VITA, ImageTiles, check_preprocess, normalize
from longvita.data.tokenizer import SpecialTokens

__all__ = ["PackedPrompt", "Segment", "build_inputs", "tokens_per_tile"]

Segment = Union[str, ImageTiles, torch.Tensor]


def tokens_per_tile(image_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5) -> int:
    """Vision tokens one tile becomes after the ViT and pixel shuffle:
    ``(image_size/patch_size)**2 * downsample_ratio**2`` (256 for Long-VITA's 448/14/0.5)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    side = image_size // patch_size
    n = side * side * downsample_ratio * downsample_ratio
    if n != int(n) or n < 1:
        raise ValueError(f"downsample_ratio {downsample_ratio} does not divide a {side}x{side} patch grid evenly")
    return int(n)


@dataclass
class PackedPrompt:
    """One tokenised prompt.

    input_ids: int64 ``(seq_len,)``.
    pixel_values: ``(n_tiles, 3, S, S)`` normalised float, or uint8 pixels when every medium
        is (raw video frames; the vision encoder normalises them), in the order of the tiles' context tokens
        (tile k fills the k-th block of N context tokens), or None without media.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None


def build_inputs(
    tokenizer: Tokenizer,
    special: SpecialTokens,
    segments: Sequence[Segment],
    *,
    tokens_per_tile: int,
    system: str | None = None,
    preprocess: str = DEFAULT_PREPROCESS,
) -> PackedPrompt:
    """Lay out one user turn of ChatML with interleaved media in ``preprocess``'s layout
    (see the module docstring).

    segments: str, ImageTiles, or a video tensor ``(frames, 3, S, S)``; every tile of
        every medium must share S.
    tokens_per_tile: N context tokens per tile (``tokens_per_tile()`` computes it).
    Raises InputError for a malformed segment, for an ImageTiles made for another
    family (its thumbnail would sit at the wrong place), for text that contains a media
    token (it would desynchronise tokens and pixels), or for a token the tokenizer lacks."""
    check_preprocess(preprocess)
    long_vita = preprocess == LONG_VITA
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
    media_ids = special.media_token_ids
    ids: list[int] = []
    pixels: list[torch.Tensor] = []
    pending_text: list[str] = []  # adjacent text is tokenised as one run

    def flush_text() -> None:
        if not pending_text:
            return
        run = tokenizer.encode("".join(pending_text), add_special_tokens=False).ids
        bad = media_ids.intersection(run)
        if bad:
            names = sorted(tokenizer.id_to_token(t) for t in bad)
            raise InputError(f"text segment contains media special token(s) {names}; pass media as ImageTiles/tensors")
        ids.extend(run)
        pending_text.clear()

    def block(start: int, context: int, end: int) -> list[int]:
        return [start] + [context] * tokens_per_tile + [end]

    def add_pixels(t: torch.Tensor, what: str) -> None:
        if pixels and t.shape[1:] != pixels[0].shape[1:]:
            raise InputError(f"{what} has tiles of shape {tuple(t.shape[1:])}, earlier media {tuple(pixels[0].shape[1:])}")
        pixels.append(t)

    if system is not None:
        pending_text.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    pending_text.append("<|im_start|>user\n")
    for k, seg in enumerate(segments):
        if isinstance(seg, str):
            pending_text.append(seg)
        elif isinstance(seg, ImageTiles):
            if seg.preprocess != preprocess:
                raise InputError(
                    f"segment {k} (image) was tiled for preprocess={seg.preprocess!r} but the prompt is laid out "
                    f"for {preprocess!r}; tile it with tile_image(..., preprocess={preprocess!r})"
                )
            add_pixels(seg.pixel_values, f"segment {k} (image)")
            flush_text()
            if not long_vita:  # every tile in one <img> block, thumbnail last
                ids += [special.img_start] + [special.img_context] * (tokens_per_tile * seg.num_tiles) + [special.img_end]
                continue
            ids += block(special.img_start, special.img_context, special.img_end)
            if seg.has_thumbnail:
                rows, cols = seg.grid
                newline = tokenizer.encode("\n", add_special_tokens=False).ids
                patch = block(special.require("patch_start"), special.require("patch_context"), special.require("patch_end"))
                for _ in range(rows):
                    ids += newline
                    for _ in range(cols):
                        ids += patch
        elif isinstance(seg, torch.Tensor):
            if seg.dim() != 4 or seg.shape[1] != 3 or seg.shape[2] != seg.shape[3] or seg.shape[0] == 0:
                raise InputError(f"segment {k} (video) must be a (frames>0, 3, S, S) tensor, got shape {tuple(seg.shape)}")
            if not (seg.is_floating_point() or seg.dtype == torch.uint8):
                raise InputError(f"segment {k} (video) must be normalised float or uint8 pixels, got {seg.dtype}")
            add_pixels(seg, f"segment {k} (video)")
            if not long_vita:  # "Frame{i}: " text before each frame's <img> block
                img = block(special.img_start, special.img_context, special.img_end)
                for i in range(seg.shape[0]):
                    pending_text.append(("\n" if i else "") + f"Frame{i + 1}: ")
                    flush_text()
                    ids += img
                continue
            flush_text()
            frame = block(special.require("vid_start"), special.require("vid_context"), special.require("vid_end"))
            ids += frame * seg.shape[0]
        else:
            raise InputError(f"segment {k} must be str, ImageTiles or a video tensor, got {type(seg).__name__}")
    pending_text.append("<|im_end|>\n<|im_start|>assistant\n")
    flush_text()

    if len({p.dtype for p in pixels}) > 1:  # uint8 frames beside float tiles: one dtype for all
        pixels = [normalize(p) if p.dtype == torch.uint8 else p for p in pixels]
    pixel_values = torch.cat(pixels) if pixels else None
    return PackedPrompt(torch.tensor(ids, dtype=torch.long), pixel_values)
