"""Needles and haystacks for needle-in-a-haystack evaluation, generated in code.

LongVA's V-NIAH needles and haystack video were never released, so these are built from
a seed instead: the same seed gives the same needles, filler and frames on any machine.

Visual needles are PIL images whose answer cannot be guessed from the question alone:
a rendered word, a rendered number, a colour filling the frame, or a drawn shape. Text
needles are LongVA's sentence "The special magic {city} number is: {7 digits}."; the
other cities give distractors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from longvita.data.palette import COLOURS, SHAPES, draw_shape
from longvita.data.needle_text import CITIES, filler_text, magic_number, magic_question, magic_sentence

__all__ = [
    "VisualNeedle", "TextNeedle", "make_visual_needles", "make_text_needles", "filler_text",
    "synthetic_haystack_frames", "NEEDLE_KINDS",
]

NEEDLE_KINDS = ("word", "number", "colour", "shape")
_WORDS = ("apple", "river", "zebra", "piano", "lemon", "tiger", "cloud", "rocket", "violin", "castle")


@dataclass(frozen=True)
class VisualNeedle:
    """One needle image with its question and answer (the answer is what is scored)."""

    id: str
    kind: str
    image: Image.Image
    question: str
    answer: str


@dataclass(frozen=True)
class TextNeedle:
    """A needle sentence, the question that asks it back and its answer."""

    id: str
    sentence: str
    question: str
    answer: str


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: the bitmap font, still legible
        return ImageFont.load_default()


def _needle_image(kind: str, value: str, size: int, rng: random.Random) -> Image.Image:
    if kind == "colour":
        return Image.new("RGB", (size, size), COLOURS[value])
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    if kind == "shape":
        m = size // 6
        draw_shape(draw, value, (m, m, size - m, size - m), (20, 20, 20))
        return img
    font = _font(max(10, size // (len(value) + 1) * 3 // 2))
    left, top, right, bottom = draw.textbbox((0, 0), value, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), value, fill=(10, 10, 10), font=font)
    return img


def make_visual_needles(n: int, seed: int = 0, size: int = 448, kinds: tuple[str, ...] = NEEDLE_KINDS) -> list[VisualNeedle]:
    """``n`` needles cycling through ``kinds``, values drawn from ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bad = [k for k in kinds if k not in NEEDLE_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {NEEDLE_KINDS}, got {kinds!r}")
    rng = random.Random(seed)
    needles = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "word":
            value, question = rng.choice(_WORDS), "What word is written in the special frame?"
        elif kind == "number":
            value, question = str(rng.randrange(10, 1000)), "What number is written in the special frame?"
        elif kind == "colour":
            value, question = rng.choice(list(COLOURS)), "What colour fills the special frame?"
        else:
            value, question = rng.choice(SHAPES), "What shape is drawn in the special frame?"
        needles.append(VisualNeedle(f"{kind}-{i}", kind, _needle_image(kind, value, size, rng), question, value))
    return needles


def make_text_needles(n: int, seed: int = 0) -> list[TextNeedle]:
    """``n`` needles with distinct cities and 7-digit numbers (LongVA's text NIAH)."""
    if not 1 <= n <= len(CITIES):
        raise ValueError(f"n must be in [1, {len(CITIES)}], got {n}")
    rng = random.Random(seed)
    cities = rng.sample(CITIES, n)
    needles = []
    for i, city in enumerate(cities):
        number = magic_number(rng)
        needles.append(TextNeedle(f"{city.lower()}-{i}", magic_sentence(city, number), magic_question(city), number))
    return needles


def distractors(needle: TextNeedle, count: int, seed: int) -> list[str]:
    """``count`` sentences like the needle's with other cities and numbers."""
    rng = random.Random(f"{seed}-{needle.id}")
    others = [c for c in CITIES if c not in needle.sentence]
    return [magic_sentence(city, magic_number(rng)) for city in rng.sample(others, min(count, len(others)))]


def synthetic_haystack_frames(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` frames of a slowly changing synthetic scene (soft colour fields and moving
    blobs): a haystack when no video is given. Frame i depends on (seed, i) only."""
    frames = []
    for i in range(n):
        rng = random.Random(f"{seed}-{i // 8}")  # a "shot" lasts 8 frames
        base = tuple(rng.randrange(60, 200) for _ in range(3))
        img = Image.new("RGB", (size, size), base)
        draw = ImageDraw.Draw(img)
        for b in range(3):
            cx = (rng.random() * size + (i % 8) * size / 32 * (b + 1)) % size
            cy = rng.random() * size
            r = size * (0.08 + 0.1 * rng.random())
            colour = tuple(rng.randrange(0, 256) for _ in range(3))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        frames.append(img)
    return frames
