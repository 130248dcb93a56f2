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

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from tokenizers import Tokenizer

from longvita.common import IGNORE_INDEX
from longvita.data.errors import InputError
from longvita.data.image import DEFAULT_PREPROCESS, LONG_VITA, ImageTiles, check_preprocess, normalize
from longvita.data.tokenizer import SpecialTokens

__all__ = ["Conversation", "MediaSpan", "PackedPrompt", "Segment", "TokenIds", "build_conversation", "build_inputs",
           "tokens_per_tile"]


@dataclass(frozen=True)
class TokenIds:
    """A segment of text already tokenised (e.g. a haystack cut at a token depth), laid
    into the prompt as these ids. They must not hold media tokens."""

    ids: Sequence[int]


Segment = Union[str, ImageTiles, torch.Tensor, TokenIds]


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


class _Layout:
    """Accumulates ids and tiles for ChatML text and media in one family's layout; the
    one implementation of the layout, shared by ``build_inputs`` (a prompt) and
    ``build_conversation`` (a training sample with labels)."""

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens, tokens_per_tile: int, preprocess: str,
                 split_special_tokens: bool = False):
        check_preprocess(preprocess)
        if tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
        self.tokenizer, self.special, self.n, self.preprocess = tokenizer, special, tokens_per_tile, preprocess
        self.long_vita = preprocess == LONG_VITA
        self.media_ids = special.media_token_ids
        self.ids: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.spans: list[MediaSpan] = []
        self.token_spans: list[tuple[int, int]] = []  # where each TokenIds segment landed
        self.pending_text: list[tuple[str, bool]] = []  # adjacent text is tokenised as one run
        self.n_tiles = 0
        self.split_special_tokens = split_special_tokens

    def text(self, s: str, content: bool = False) -> None:
        """Queue text; ``content``: it comes from the caller (a prompt, a turn's content),
        not from the template, so with ``split_special_tokens`` its special-token strings
        are spelled out as plain text."""
        self.pending_text.append((s, content))

    def _encode(self, text: str, literal: bool) -> list[int]:
        if not literal:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        saved = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = True  # tokenizers' switch: special tokens become plain text
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = saved

    def flush_text(self) -> None:
        if not self.pending_text:
            return
        if self.split_special_tokens and any(c for _, c in self.pending_text):
            # template text and content are tokenised apart (they meet at special-token
            # boundaries, where the tokenizer splits anyway, or at plain text)
            run = [t for text, content in self.pending_text for t in self._encode(text, content)]
        else:
            run = self._encode("".join(text for text, _ in self.pending_text), False)
        bad = self.media_ids.intersection(run)
        if bad:
            names = sorted(self.tokenizer.id_to_token(t) for t in bad)
            raise InputError(f"text segment contains media special token(s) {names}; pass media as ImageTiles/tensors")
        self.ids.extend(run)
        self.pending_text.clear()

    def _block(self, start: int, context: int, end: int) -> list[int]:
        return [start] + [context] * self.n + [end]

    def _add_pixels(self, t: torch.Tensor, what: str) -> None:
        if self.pixels and t.shape[1:] != self.pixels[0].shape[1:]:
            raise InputError(f"{what} has tiles of shape {tuple(t.shape[1:])}, earlier media {tuple(self.pixels[0].shape[1:])}")
        self.pixels.append(t)

    def segment(self, k: int, seg: Segment) -> None:
        """Append segment ``k`` (text, image tiles or video frames)."""
        special, ids = self.special, self.ids
        if isinstance(seg, str):
            self.text(seg, content=True)
            return
        if isinstance(seg, TokenIds):
            bad = self.media_ids.intersection(seg.ids)
            if bad:
                raise InputError(f"segment {k} (token ids) contains media token id(s) {sorted(bad)}")
            self.flush_text()
            self.token_spans.append((len(ids), len(ids) + len(seg.ids)))
            ids.extend(int(t) for t in seg.ids)
            return
        if isinstance(seg, ImageTiles):
            if seg.preprocess != self.preprocess:
                raise InputError(
                    f"segment {k} (image) was tiled for preprocess={seg.preprocess!r} but the prompt is laid out "
                    f"for {self.preprocess!r}; tile it with tile_image(..., preprocess={self.preprocess!r})"
                )
            self._add_pixels(seg.pixel_values, f"segment {k} (image)")
            self.flush_text()
            first = len(ids)
            if not self.long_vita:  # every tile in one <img> block, thumbnail last
                ids += [special.img_start] + [special.img_context] * (self.n * seg.num_tiles) + [special.img_end]
            else:
                ids += self._block(special.img_start, special.img_context, special.img_end)
                if seg.has_thumbnail:
                    rows, cols = seg.grid
                    newline = self.tokenizer.encode("\n", add_special_tokens=False).ids
                    patch = self._block(special.require("patch_start"), special.require("patch_context"),
                                        special.require("patch_end"))
                    for _ in range(rows):
                        ids += newline
                        for _ in range(cols):
                            ids += patch
            self._span(first, seg.num_tiles)
        elif isinstance(seg, torch.Tensor):
            if seg.dim() != 4 or seg.shape[1] != 3 or seg.shape[2] != seg.shape[3] or seg.shape[0] == 0:
                raise InputError(f"segment {k} (video) must be a (frames>0, 3, S, S) tensor, got shape {tuple(seg.shape)}")
            if not (seg.is_floating_point() or seg.dtype == torch.uint8):
                raise InputError(f"segment {k} (video) must be normalised float or uint8 pixels, got {seg.dtype}")
            self._add_pixels(seg, f"segment {k} (video)")
            if not self.long_vita:  # "Frame{i}: " text before each frame's <img> block
                img = self._block(special.img_start, special.img_context, special.img_end)
                self.flush_text()
                first = len(ids)
                for i in range(seg.shape[0]):
                    self.text(("\n" if i else "") + f"Frame{i + 1}: ")
                    self.flush_text()
                    ids += img
            else:
                self.flush_text()
                first = len(ids)
                frame = self._block(special.require("vid_start"), special.require("vid_context"), special.require("vid_end"))
                ids += frame * seg.shape[0]
            self._span(first, seg.shape[0])
        else:
            raise InputError(f"segment {k} must be str, TokenIds, ImageTiles or a video tensor, got {type(seg).__name__}")

    def _span(self, first: int, n_tiles: int) -> None:
        self.spans.append(MediaSpan(first, len(self.ids), self.n_tiles, self.n_tiles + n_tiles))
        self.n_tiles += n_tiles

    def pixel_values(self) -> torch.Tensor | None:
        pixels = self.pixels
        if len({p.dtype for p in pixels}) > 1:  # uint8 frames beside float tiles: one dtype for all
            pixels = [normalize(p) if p.dtype == torch.uint8 else p for p in pixels]
        return torch.cat(pixels) if pixels else None


@dataclass(frozen=True)
class MediaSpan:
    """Where one medium sits: its tokens ``[start, end)`` (for ``internvl`` video, from the
    first frame's ``<img>`` to the last ``</img>``, the ``Frame{i}:`` text between them
    included) and its tiles ``[tile_start, tile_end)`` in ``pixel_values``. A sample may be
    cut only outside these spans (cutting inside would leave tokens without tiles)."""

    start: int
    end: int
    tile_start: int
    tile_end: int


def build_inputs(
    tokenizer: Tokenizer,
    special: SpecialTokens,
    segments: Sequence[Segment],
    *,
    tokens_per_tile: int,
    system: str | None = None,
    preprocess: str = DEFAULT_PREPROCESS,
    split_special_tokens: bool = False,
) -> PackedPrompt:
    """Lay out one user turn of ChatML with interleaved media in ``preprocess``'s layout
    (see the module docstring).

    segments: str, TokenIds, ImageTiles, or a video tensor ``(frames, 3, S, S)``; every
        tile of every medium must share S.
    tokens_per_tile: N context tokens per tile (``tokens_per_tile()`` computes it).
    Raises InputError for a malformed segment, for an ImageTiles made for another
    family (its thumbnail would sit at the wrong place), for text that contains a media
    token (it would desynchronise tokens and pixels), or for a token the tokenizer lacks.

    split_special_tokens: False (default, as transformers' tokenizers): a chat-control
    string typed in the text (``<|im_start|>``, ``<|im_end|>``) becomes that control token,
    so a user can open a turn of their own. True: such strings in the segments and the
    system text are tokenised as plain characters; use it for untrusted text. (Media
    tokens in text are refused either way.)"""
    layout = _Layout(tokenizer, special, tokens_per_tile, preprocess, split_special_tokens)
    if system is not None:
        layout.text("<|im_start|>system\n")
        layout.text(system, content=True)
        layout.text("<|im_end|>\n")
    layout.text("<|im_start|>user\n")
    for k, seg in enumerate(segments):
        layout.segment(k, seg)
    layout.text("<|im_end|>\n<|im_start|>assistant\n")
    layout.flush_text()
    return PackedPrompt(torch.tensor(layout.ids, dtype=torch.long), layout.pixel_values())


ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """A tokenised multi-turn conversation for training.

    input_ids: int64 ``(L,)``, the whole conversation, every turn closed by ``<|im_end|>\\n``.
    target_mask: bool ``(L,)``, True on the tokens the model is trained to produce: each
        assistant turn's content and its ``<|im_end|>`` (not the role header, not the
        newline after ``<|im_end|>``). Unshifted; ``shifted_labels`` turns it into labels.
    pixel_values: as in PackedPrompt.
    media: one MediaSpan per medium, in order.
    token_spans: the ``[start, end)`` of each ``TokenIds`` segment, in order.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    media: list[MediaSpan]
    token_spans: list[tuple[int, int]] = field(default_factory=list)

    def shifted_labels(self, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Labels already shifted within the sample: row i holds ``input_ids[i+1]`` when
        token i+1 is a target, else ``ignore_index``; the last row is always ignored, so
        packing samples side by side never pairs one sample's last token with the next's first."""
        labels = torch.full_like(self.input_ids, ignore_index)
        if self.input_ids.numel() > 1:
            labels[:-1] = torch.where(self.target_mask[1:], self.input_ids[1:], torch.full_like(self.input_ids[1:], ignore_index))
        return labels


def build_conversation(
    tokenizer: Tokenizer,
    special: SpecialTokens,
    turns: Sequence[tuple[str, Sequence[Segment]]],
    *,
    tokens_per_tile: int,
    preprocess: str = DEFAULT_PREPROCESS,
    pixels: bool = True,
    split_special_tokens: bool = False,
) -> Conversation:
    """Lay out a whole ChatML conversation ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
    per turn, media laid out as ``build_inputs`` does, and mark the assistant targets.

    turns: ``(role, segments)`` with role in system/user/assistant; assistant and system
        turns hold text only. An assistant turn's content is tokenised as its own run
        (the header before it and ``<|im_end|>`` after it are special-token boundaries
        anyway), so the target mask falls on token boundaries exactly.
    ``pixels=False`` lays out the tokens only (``pixel_values`` None): for media whose
    embeddings come from elsewhere (a cache), a video segment may then be a stand-in such
    as ``torch.zeros(1, 3, S, S, dtype=torch.uint8).expand(F, -1, -1, -1)``.
    ``split_special_tokens``: as for ``build_inputs``, for every turn's text.
    Raises InputError for an unknown role, media outside a user turn, or anything
    ``build_inputs`` rejects."""
    layout = _Layout(tokenizer, special, tokens_per_tile, preprocess, split_special_tokens)
    mask: list[bool] = []

    def mark(target: bool) -> None:
        layout.flush_text()
        mask.extend([target] * (len(layout.ids) - len(mask)))

    k = 0
    for t, (role, segments) in enumerate(turns):
        if role not in ROLES:
            raise InputError(f"turn {t} has role {role!r}; expected one of {list(ROLES)}")
        if role != "user" and any(not isinstance(s, str) for s in segments):
            raise InputError(f"turn {t} ({role}) contains media; only user turns may")
        layout.text(f"<|im_start|>{role}\n")
        if role == "assistant":
            mark(False)
            layout.text("".join(segments), content=True)
            layout.flush_text()
            layout.ids.append(special.im_end)  # direct id: the content run ends here
            mark(True)
            layout.text("\n")
        else:
            for seg in segments:
                layout.segment(k, seg)
                k += 1
            layout.text("<|im_end|>\n")
    mark(False)
    return Conversation(torch.tensor(layout.ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool),
                        layout.pixel_values() if pixels else None, layout.spans, layout.token_spans)
