"""Training data: JSONL manifests and tokenised samples with shifted labels.

Manifest (one JSON object per line; blank lines and lines starting with ``#`` are skipped)::

    {"source": "shapes", "images": ["img/0.png"], "videos": [],
     "messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "<image>\\nWhat colour is the square?"},
                  {"role": "assistant", "content": "red"}]}

- ``messages``: ChatML turns (system/user/assistant, any number, at least one assistant).
- media: user content refers to them with the placeholders ``<image>`` / ``<video>``,
  which consume ``images`` / ``videos`` in order (each list is used up exactly). A sample
  with media lists but no placeholder at all gets its images, then its videos, at the
  start of the first user turn (one per line, as LLaVA-style data expects).
  Relative paths are relative to the manifest's folder.
- ``source``: the data source the sample belongs to (mixtures weigh by it); defaults to
  the manifest's file stem.

Labels are shifted inside each sample (row i holds the token row i must predict, or
``IGNORE_INDEX``), so packs need no further shift and no pair crosses a sample boundary;
the loss is ``cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)`` row by row.

Packs, mixtures and pack streams are ``packing.py``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from longvita.common import IGNORE_INDEX
from longvita.data.errors import InputError
from longvita.data.image import DEFAULT_PREPROCESS, check_preprocess, load_image, tile_image
from longvita.data.template import MediaSpan, build_conversation
from longvita.data.tokenizer import SpecialTokens
from longvita.data.video import read_video

__all__ = ["IGNORE_INDEX", "DataWarning", "MediaConfig", "Sample", "TokenizedSample", "read_manifest", "tokenize_sample",
           "truncate"]

_PLACEHOLDER = re.compile(r"<image>|<video>")


class DataWarning(UserWarning):
    """A training sample was truncated or skipped (the message names it and why)."""


# --------------------------------------------------------------------------- manifest


@dataclass
class Sample:
    """One manifest line: ``messages`` as given, media paths resolved, and where it came from."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    source: str = "default"
    name: str = ""  # "file:line", used in warnings


def _bad(path: Path, line: int, what: str) -> InputError:
    return InputError(f"manifest {str(path)!r} line {line}: {what}")


def _check_messages(messages, n_images: int, n_videos: int, path: Path, line: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad(path, line, "'messages' must be a non-empty list of {role, content} objects")
    seen = {"<image>": 0, "<video>": 0}
    for t, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _bad(path, line, f"message {t} must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise _bad(path, line, f"message {t} has role {m['role']!r}; expected system, user or assistant")
        found = _PLACEHOLDER.findall(m["content"])
        if found and m["role"] != "user":
            raise _bad(path, line, f"message {t} ({m['role']}) contains a media placeholder; only user turns may")
        for p in found:
            seen[p] += 1
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad(path, line, "no assistant message (nothing to train on)")
    if (n_images or n_videos) and not any(m["role"] == "user" for m in messages):
        raise _bad(path, line, "media are listed but there is no user message to put them in")
    if seen["<image>"] + seen["<video>"]:  # placeholders given: they must use the lists up exactly
        if seen["<image>"] != n_images or seen["<video>"] != n_videos:
            raise _bad(path, line, f"{seen['<image>']} <image> / {seen['<video>']} <video> placeholders but "
                                   f"{n_images} images / {n_videos} videos listed")


def read_manifest(path: str | Path, *, source: str | None = None) -> list[Sample]:
    """Read a JSONL manifest (see the module docstring) into Samples.

    source: overrides every line's ``source``. Raises InputError naming the file and the
    line for a line that is not JSON or not a valid sample; media files are not opened
    here (a missing one skips its sample at packing time, with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} does not exist or is not a file")
    root = path.parent
    samples = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"manifest {str(path)!r} is unreadable ({exc.strerror or exc})") from None
    for line_no, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise _bad(path, line_no, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(path, line_no, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise _bad(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        media = {}
        for key in ("images", "videos"):
            value = obj.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _bad(path, line_no, f"'{key}' must be a list of paths")
            media[key] = [p if Path(p).is_absolute() else root / p for p in map(Path, value)]
        _check_messages(obj.get("messages"), len(media["images"]), len(media["videos"]), path, line_no)
        src = source if source is not None else obj.get("source", path.stem)
        if not isinstance(src, str):
            raise _bad(path, line_no, "'source' must be a string")
        samples.append(Sample(obj["messages"], media["images"], media["videos"], src, f"{path}:{line_no}"))
    return samples


# --------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class MediaConfig:
    """How a sample's media become tiles and tokens (the model's vision settings).

    tokens_per_tile / image_size: the model's (``tiny`` preset: 4 / 56; Long-VITA: 256 / 448).
    min_num / max_num: image grid tiles; max_frames / max_fps: video frame sampling."""

    tokens_per_tile: int = 256
    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    max_frames: int = 4096
    max_fps: float = 1.0
    preprocess: str = DEFAULT_PREPROCESS

    def __post_init__(self):
        check_preprocess(self.preprocess, "MediaConfig.preprocess")

    @classmethod
    def for_model(cls, config, **overrides) -> "MediaConfig":
        """The media settings a model's config implies (a ``LongVITAConfig``, read by its
        fields: this layer does not import the model)."""
        return cls(tokens_per_tile=config.tokens_per_tile, image_size=config.vision.image_size,
                   preprocess=config.preprocess, **overrides)


@dataclass
class TokenizedSample:
    """One sample ready to pack.

    input_ids / labels: int64 ``(L,)``; labels shifted within the sample (see module docstring).
    pixel_values: ``(T, 3, S, S)`` tiles in order, uint8 (video frames) or float, or None.
    media: token/tile span of each medium."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    media: list[MediaSpan]
    source: str = "default"
    name: str = ""

    def __len__(self) -> int:
        return self.input_ids.numel()


def _turns(sample: Sample, images: list, videos: list) -> list[tuple[str, list]]:
    media = {"<image>": iter(images), "<video>": iter(videos)}
    uses_placeholders = any(_PLACEHOLDER.search(m["content"]) for m in sample.messages)
    turns, prepend = [], not uses_placeholders and (images or videos)
    for m in sample.messages:
        segments: list = []
        if m["role"] == "user":
            if prepend:
                for x in list(images) + list(videos):
                    segments += [x, "\n"]
                prepend = False
            pos = 0
            for match in _PLACEHOLDER.finditer(m["content"]):
                segments += [m["content"][pos:match.start()], next(media[match.group()])]
                pos = match.end()
            segments.append(m["content"][pos:])
        else:
            segments.append(m["content"])
        turns.append((m["role"], [s for s in segments if not (isinstance(s, str) and not s)]))
    return turns


def tokenize_sample(sample: Sample, tokenizer: Tokenizer, special: SpecialTokens, media: MediaConfig) -> TokenizedSample:
    """Load the sample's media and lay out the whole conversation with shifted labels.

    Images become float tiles (``tile_image``), videos uint8 frames (``read_video(raw=True)``);
    a sample holding both gets float for all. Raises InputError naming the file for a
    missing or corrupt medium (``PackStream`` turns that into a skip)."""
    images = [tile_image(load_image(p, image_size=media.image_size, min_num=media.min_num, max_num=media.max_num),
                         image_size=media.image_size, min_num=media.min_num, max_num=media.max_num,
                         preprocess=media.preprocess) for p in sample.images]
    videos = [read_video(p, max_frames=media.max_frames, max_fps=media.max_fps, image_size=media.image_size,
                         preprocess=media.preprocess, raw=True).pixel_values for p in sample.videos]
    conv = build_conversation(tokenizer, special, _turns(sample, images, videos),
                              tokens_per_tile=media.tokens_per_tile, preprocess=media.preprocess)
    return TokenizedSample(conv.input_ids, conv.shifted_labels(IGNORE_INDEX), conv.pixel_values, conv.media,
                           sample.source, sample.name)


def truncate(sample: TokenizedSample, limit: int) -> TokenizedSample:
    """Cut ``sample`` to at most ``limit`` tokens with a DataWarning naming it. A medium
    whose token span would be cut is dropped with everything after it (the cut moves to
    its start), so tokens and tiles stay in step; the new last row's label is ignored."""
    n = len(sample)
    if n <= limit:
        return sample
    cut, tiles = limit, 0
    for span in sample.media:
        if span.end <= cut:
            tiles = span.tile_end
        else:
            cut = min(cut, span.start)
            break
    dropped = sum(1 for s in sample.media if s.end > cut)
    warnings.warn(f"sample {sample.name or sample.source!r} has {n} tokens, more than the pack's {limit}: truncated "
                  f"to {cut} tokens" + (f" ({dropped} medium/media cut off)" if dropped else ""), DataWarning, stacklevel=3)
    labels = sample.labels[:cut].clone()
    if cut:
        labels[-1] = IGNORE_INDEX  # it pointed at a token that is gone
    pv = sample.pixel_values[:tiles] if sample.pixel_values is not None and tiles else None
    return TokenizedSample(sample.input_ids[:cut], labels, pv, [s for s in sample.media if s.end <= cut],
                           sample.source, sample.name)
