"""A small synthetic vision-language data set, generated in code (the embedded default
for training demos; nothing is downloaded).

Images are drawn with PIL: a coloured shape (circle, square or triangle) on a plain
background beside a rendered word or digit. Videos (only when PyAV is importable) are
short mp4 clips of a shape moving across the frame. Each sample is a ChatML conversation
about its media with short, checkable answers ("What colour is the square?" -> "red").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from longvita.data.palette import COLOURS as PALETTE
from longvita.data.palette import SHAPES as ALL_SHAPES
from longvita.data.palette import draw_shape as _draw_shape

__all__ = ["COLOURS", "SHAPES", "WORDS", "synthetic_picture", "write_synthetic_dataset"]

# the palette's colours that stand out on both of this set's backgrounds, and its simplest shapes
COLOURS = {name: rgb for name, rgb in PALETTE.items() if name not in ("white", "black")}
SHAPES = ALL_SHAPES[:3]
WORDS = ("cat", "sun", "box", "map", "7", "3", "42", "9")
DIRECTIONS = ("left to right", "right to left")


def _image(rng: random.Random, width: int, height: int) -> tuple[Image.Image, dict]:
    colour, shape, word = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(WORDS)
    background = (245, 245, 245) if rng.random() < 0.5 else (40, 40, 40)
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    side = min(width // 2, height) * 3 // 4
    x0, y0 = (width // 2 - side) // 2, (height - side) // 2
    _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    ink = (0, 0, 0) if background[0] > 128 else (255, 255, 255)
    draw.text((width // 2 + 4, height // 2 - 6), word, fill=ink, font=ImageFont.load_default())
    return img, {"colour": colour, "shape": shape, "word": word}


def _write_video(path: Path, rng: random.Random, size: int, frames: int, fps: int) -> dict:
    import av  # noqa: PLC0415 (optional dependency)

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    direction = rng.choice(DIRECTIONS)
    side = size // 3
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            t = i / max(frames - 1, 1)
            if direction == "right to left":
                t = 1 - t
            x = int(t * (size - side))
            img = Image.new("RGB", (size, size), (245, 245, 245))
            _draw_shape(ImageDraw.Draw(img), shape, (x, size // 3, x + side, size // 3 + side), COLOURS[colour])
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"colour": colour, "shape": shape, "direction": direction}


def _image_sample(rng: random.Random, rel: str, facts: dict) -> dict:
    questions = [
        (f"What colour is the {facts['shape']}?", facts["colour"]),
        ("Which shape is drawn?", facts["shape"]),
        ("What is written next to the shape?", facts["word"]),
    ]
    rng.shuffle(questions)
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for t, (q, a) in enumerate(questions[: rng.randint(1, 3)]):
        messages.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + q})
        messages.append({"role": "assistant", "content": a})
    return {"source": "synthetic-images", "images": [rel], "messages": messages}


def _video_sample(rng: random.Random, rel: str, facts: dict) -> dict:
    q, a = rng.choice([
        (f"Which way does the {facts['shape']} move?", facts["direction"]),
        ("What colour is the moving shape?", facts["colour"]),
    ])
    return {"source": "synthetic-videos", "videos": [rel],
            "messages": [{"role": "user", "content": f"<video>\n{q}"}, {"role": "assistant", "content": a}]}


def _text_sample(rng: random.Random) -> dict:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {"source": "synthetic-text",
            "messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}


def synthetic_picture(seed: int, size: int = 96) -> Image.Image:
    """A deterministic test picture (colour gradients and a disc): what ``longvita generate``
    shows a model that has no picture of its own (the random tiny model)."""
    rng = np.random.default_rng(seed)
    h, w = size, int(size * 1.5)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, rng.integers(0, 255))], -1)
    cy, cx, r = h / 2, w / 3, h / 4
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return Image.fromarray(img.astype("uint8"), "RGB")


def write_synthetic_dataset(folder: str | Path, n_samples: int = 64, seed: int = 0, *, image_size: int = 56,
                            video_frames: int = 4, video_fps: int = 1, videos: bool | None = None) -> Path:
    """Write ``n_samples`` conversations and their media under ``folder`` and return the
    manifest path (``folder/manifest.jsonl``; media in ``folder/media/``).

    Samples cycle through images (about 60%), videos (about 25%, only when PyAV is
    importable; image samples instead otherwise) and text-only arithmetic; sources are
    ``synthetic-images`` / ``synthetic-videos`` / ``synthetic-text``. Images are
    ``2*image_size x image_size`` (a 1x2 grid plus thumbnail when tiled at ``image_size``),
    videos ``image_size`` square at ``video_fps``. Same ``seed`` -> same manifest and pixels."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if videos is None:
        try:
            import av  # noqa: F401  (only to know whether clips can be made)
            videos = True
        except ImportError:
            videos = False
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n_samples):
        kind = rng.random()
        if videos and 0.6 <= kind < 0.85:
            rel = f"media/video_{i:05d}.mp4"
            facts = _write_video(folder / rel, rng, image_size, video_frames, video_fps)
            lines.append(_video_sample(rng, rel, facts))
        elif kind < 0.85:
            rel = f"media/image_{i:05d}.png"
            img, facts = _image(rng, 2 * image_size, image_size)
            img.save(folder / rel)
            lines.append(_image_sample(rng, rel, facts))
        else:
            lines.append(_text_sample(rng))
    manifest = folder / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    tmp.replace(manifest)
    return manifest
