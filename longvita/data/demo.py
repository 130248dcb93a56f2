"""The demo model's training and held-out data, generated in code (nothing is downloaded).

Tasks (``TASKS``), each asked in several phrasings as users would ask them:

- ``colour``: one shape on a plain or noisy background; "What colour is the shape?" ...
- ``shape``: the same images; "Which shape is drawn?" ...
- ``count``: one to four shapes of one kind; "How many circles are there?" ...
- ``text``: a rendered digit or short word; "What is written in the image?" ...
- ``which``: two or three images; "Which image shows the red circle?" -> first/second/third
- ``frame``: a short clip (mp4, needs PyAV) whose frames repeat one image except one that
  differs; "Which frame is different?" -> 1..4 (skipped without PyAV)
- ``retrieval``: a key-value sentence hidden in filler text, asked back at the end

``write_demo_dataset(folder, n, seed)`` writes a training manifest (see
``longvita.data.training``); ``demo_examples(n, seed)`` gives held-out examples in memory
(question, images/frames, answer) for ``longvita eval demo``. Answers are canonical
(``colour`` answers use the British spelling whatever the question said).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["TASKS", "DemoExample", "demo_examples", "write_demo_dataset", "DEMO_IMAGE_SIZE", "DEMO_QUESTION"]

DEMO_IMAGE_SIZE = 112
TASKS = ("colour", "shape", "count", "text", "which", "frame", "retrieval")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (35, 80, 230), "yellow": (235, 215, 20),
           "purple": (140, 40, 185), "orange": (245, 135, 20), "white": (250, 250, 250), "black": (12, 12, 12)}
SHAPES = ("circle", "square", "triangle", "star")
TEXTS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "cat", "sun", "box", "map", "owl", "pen")
ORDINALS = ("first", "second", "third")
KEYS = ("falcon", "harbor", "maple", "comet", "violet", "walrus", "canyon", "ember", "glacier", "lotus",
        "meadow", "nebula", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "willow", "zephyr")
_FILLER = ("the", "river", "ran", "past", "old", "stone", "walls", "and", "quiet", "fields", "while", "birds",
           "sang", "over", "green", "hills", "in", "soft", "morning", "light", "people", "walked", "to", "town")

# The built-in example: what `longvita generate` asks about its generated image.
DEMO_QUESTION = "What colour is the shape?"

_COLOUR_Q = ("What colour is the shape?", "What color is the shape?", "What colour is the {shape}?",
             "What color is the {shape}?", "Which colour is the {shape}?", "Tell me the colour of the shape.",
             "What is the colour of the {shape}?")
_SHAPE_Q = ("Which shape is drawn?", "What shape is shown?", "What shape is in the image?",
            "Name the shape.", "What kind of shape is this?", "What is drawn in the image?")
_COUNT_Q = ("How many {shape}s are there?", "How many shapes are in the image?", "Count the shapes.",
            "How many {shape}s do you see?", "What is the number of shapes?")
_TEXT_Q = ("What is written in the image?", "What does the image say?", "Read the text in the image.",
           "Which word or digit is shown?", "What text is shown?")
_WHICH_Q = ("Which image shows the {colour} {shape}?", "Which image has the {colour} {shape}?",
            "In which image is the {colour} {shape}?", "Which picture shows the {colour} {shape}?")
_FRAME_Q = ("Which frame is different?", "Which frame differs from the others?", "Which frame is the odd one out?")
_RETRIEVAL_Q = ("What is the code for {key}?", "What is the secret code for {key}?", "Tell me the code for {key}.")


@dataclass
class DemoExample:
    """One question with its media (PIL images, or the frames of one clip) and answer."""

    task: str
    question: str
    answer: str
    images: list = field(default_factory=list)
    frames: list = field(default_factory=list)  # the clip's frames (task 'frame')


def _background(rng: random.Random, size: int, avoid: tuple | None = None) -> Image.Image:
    kind = rng.random()
    if kind < 0.6:
        while True:
            base = tuple(rng.randrange(90, 200) for _ in range(3))
            if avoid is None or sum(abs(a - b) for a, b in zip(base, avoid)) > 150:
                break
        return Image.new("RGB", (size, size), base)
    # noisy: grey noise, low contrast, so shapes stay visible
    arr = np.random.default_rng(rng.randrange(2**32)).integers(100, 180, (size, size, 1), dtype=np.uint8)
    return Image.fromarray(np.repeat(arr, 3, axis=2))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        import math

        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        draw.polygon([(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                       cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)], fill=fill)


def shape_image(rng: random.Random, colour: str, shape: str, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    img = _background(rng, size, COLOURS[colour])
    side = rng.randrange(size // 2, size * 4 // 5)
    x0, y0 = rng.randrange(0, size - side + 1), rng.randrange(0, size - side + 1)
    _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    return img


def _count_image(rng: random.Random, n: int, colour: str, shape: str, size: int) -> Image.Image:
    img = _background(rng, size, COLOURS[colour])
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(4), n)  # a 2x2 grid of places: shapes never overlap
    half = size // 2
    for c in cells:
        side = rng.randrange(half * 5 // 10, half * 8 // 10)
        x0 = (c % 2) * half + rng.randrange(0, half - side + 1)
        y0 = (c // 2) * half + rng.randrange(0, half - side + 1)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    return img


def _text_image(rng: random.Random, text: str, size: int) -> Image.Image:
    dark = rng.random() < 0.5
    img = Image.new("RGB", (size, size), (20, 20, 20) if dark else (240, 240, 240))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=size // 2 if len(text) == 1 else size // 3)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    dx = rng.randrange(-size // 10, size // 10 + 1)
    dy = rng.randrange(-size // 10, size // 10 + 1)
    draw.text(((size - (r - l)) / 2 - l + dx, (size - (b - t)) / 2 - t + dy), text,
              fill=(240, 240, 240) if dark else (15, 15, 15), font=font)
    return img


def _filler(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_FILLER) for _ in range(n_words))


def make_example(rng: random.Random, task: str, size: int = DEMO_IMAGE_SIZE, max_filler_words: int = 120) -> DemoExample:
    """One example of ``task`` drawn from ``rng``."""
    if task in ("colour", "shape"):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = shape_image(rng, colour, shape, size)
        q = rng.choice(_COLOUR_Q if task == "colour" else _SHAPE_Q).format(shape=shape)
        return DemoExample(task, q, colour if task == "colour" else shape, [img])
    if task == "count":
        n, colour, shape = rng.randint(1, 4), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        q = rng.choice(_COUNT_Q).format(shape=shape)
        return DemoExample(task, q, str(n), [_count_image(rng, n, colour, shape, size)])
    if task == "text":
        text = rng.choice(TEXTS)
        return DemoExample(task, rng.choice(_TEXT_Q), text, [_text_image(rng, text, size)])
    if task == "which":
        k = rng.choice((2, 3))
        pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], k)
        target = rng.randrange(k)
        images = [shape_image(rng, c, s, size) for c, s in pairs]
        colour, shape = pairs[target]
        q = rng.choice(_WHICH_Q).format(colour=colour, shape=shape) + " Answer " + " or ".join(ORDINALS[:k]) + "."
        return DemoExample(task, q, ORDINALS[target], images)
    if task == "frame":
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        other = rng.choice([c for c in COLOURS if c != colour])
        base = shape_image(random.Random(rng.random()), colour, shape, size)
        odd = rng.randrange(4)
        frames = [base.copy() for _ in range(4)]
        draw = ImageDraw.Draw(frames[odd])
        m = size // 8
        _draw_shape(draw, rng.choice(SHAPES), (m, m, size - m, size - m), COLOURS[other])
        return DemoExample(task, rng.choice(_FRAME_Q) + " Answer with its number.", str(odd + 1), frames=frames)
    if task == "retrieval":
        key, value = rng.choice(KEYS), str(rng.randrange(1000, 10000))
        words = rng.randrange(10, max_filler_words + 1)
        at = rng.randrange(words + 1)
        before, after = _filler(rng, at), _filler(rng, words - at)
        text = f"{before} The code for {key} is {value}. {after}".strip()
        return DemoExample(task, text + "\n" + rng.choice(_RETRIEVAL_Q).format(key=key), value)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _tasks(videos: bool) -> tuple[str, ...]:
    return TASKS if videos else tuple(t for t in TASKS if t != "frame")


def _have_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def demo_examples(n_per_task: int, seed: int, tasks: tuple[str, ...] | None = None,
                  size: int = DEMO_IMAGE_SIZE) -> list[DemoExample]:
    """Held-out examples: ``n_per_task`` of each task, from ``seed`` (use a seed the
    training set did not: ``write_demo_dataset`` draws from ``seed`` and the eval from
    ``seed + 10**6``)."""
    rng = random.Random(f"demo-eval-{seed}")
    return [make_example(rng, t, size) for t in (tasks or TASKS) for _ in range(n_per_task)]


def _write_clip(path: Path, frames: list, fps: int = 1) -> None:
    import av

    size = frames[0].size[0]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: the odd frame must survive the codec
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_demo_dataset(folder: str | Path, n_samples: int, seed: int = 0, *, videos: bool | None = None,
                       size: int = DEMO_IMAGE_SIZE) -> Path:
    """Write ``n_samples`` training conversations (tasks in turn) and their media under
    ``folder``; returns ``folder/manifest.jsonl``. Same seed, same files."""
    if videos is None:
        videos = _have_av()
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"demo-train-{seed}")
    tasks = _tasks(videos)
    lines = []
    for i in range(n_samples):
        ex = make_example(rng, tasks[i % len(tasks)], size)
        record: dict = {"source": f"demo-{ex.task}"}
        if ex.frames:
            rel = f"media/{i:06d}.mp4"
            _write_clip(folder / rel, ex.frames)
            record["videos"] = [rel]
            content = "<video>\n" + ex.question
        elif ex.images:
            rels = []
            for j, img in enumerate(ex.images):
                rel = f"media/{i:06d}_{j}.png"
                img.save(folder / rel)
                rels.append(rel)
            record["images"] = rels
            content = "<image>" * len(rels) + "\n" + ex.question
        else:
            content = ex.question
        record["messages"] = [{"role": "user", "content": content}, {"role": "assistant", "content": ex.answer}]
        lines.append(json.dumps(record))
    manifest = folder / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest
