"""The demo model's training and held-out data, generated in code (nothing is downloaded).

Tasks (``TASKS``), each asked in several phrasings as users would ask them:

- ``colour``: one shape on a plain or noisy background; "What colour is the shape?" ...
- ``shape``: the same images; "Which shape is drawn?" ...
- ``count``: one to four shapes of one kind; "How many circles are there?" ...
- ``text``: a rendered digit or short word; "What is written in the image?" ...
- ``which``: two or three images; "Which image shows the red circle?" -> first/second/third
- ``frame``: a short clip (mp4, needs PyAV) whose frames repeat one image except one that
  differs; "Which frame is different?" -> 1..4 (skipped without PyAV)
- ``repeat``: a short random string said back ("Repeat after me: 4polkhq")
- ``retrieval``: LongVA's needle "The special magic {city} number is: {7 digits}." hidden in
  filler prose up to the trained length, asked back at the end: the format of
  ``longvita eval niah --mode text``

``write_demo_dataset(folder, n, seed)`` writes a training manifest (see
``longvita.data.training``); ``demo_examples(n, seed)`` gives held-out examples in memory
(question, images/frames, answer) for ``longvita eval demo``. Answers are canonical
(``colour`` answers use the British spelling whatever the question said).

What makes the recipe fit 30 minutes of 2 CPU cores (each measured, benchmarks/RESULTS.md):

- a curriculum: the set opens with ``WARMUP_SAMPLES`` copy samples (``WARMUP_TASK``), then
  cycles of ``TASK_WEIGHTS``, and the recipe reads it in order;
- training conversations ask follow-up questions about the same picture (its colour,
  shape, count), so one image's tokens pay for two or three answers; held-out examples
  ask one question;
- shapes and text sit near the middle of the picture (a few pixels of jitter, sizes in a
  narrow band): a ViT trained from scratch has no translation invariance to start from,
  and with free placement it learnt shapes at half the rate.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from longvita.data.needle_text import CITIES, filler_text, magic_number, magic_sentence
from longvita.data.palette import COLOURS, SHAPES
from longvita.data.palette import draw_shape as _draw_shape

__all__ = ["TASKS", "TASK_WEIGHTS", "WARMUP_SAMPLES", "WARMUP_TASK", "DemoExample", "demo_examples", "demo_picture",
           "write_demo_dataset", "write_clip", "have_pyav", "DEMO_IMAGE_SIZE", "DEMO_QUESTION"]

DEMO_IMAGE_SIZE = 112
TASKS = ("colour", "shape", "count", "text", "which", "frame", "retrieval", "repeat")
TEXTS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "cat", "sun", "box", "map", "owl", "pen")
ORDINALS = ("first", "second", "third")

# Samples of each task per cycle of the training set, after the warm-up. Weighted by what
# a task costs to learn, not evenly: colour is learnt first and from every follow-up,
# reading text takes the most examples and trains the vision tower for the other tasks
# too (a run with text cut from 40 % to 25 % of the samples lost 34 points of text and 20
# of shape), counting is next, a retrieval sample is ~3x the tokens of a one-image sample,
# and ``repeat`` keeps the warm-up's copy circuit in use.
TASK_WEIGHTS = {"colour": 1, "shape": 4, "count": 8, "text": 12, "which": 1, "frame": 1, "retrieval": 3, "repeat": 2}

# The curriculum's warm-up: the training set opens with this many samples of short
# strings said back. Copying (the attention circuit retrieval needs: previous-token and
# induction heads) forms within ~400 steps when packs are dense with copy targets, but
# not in 2,000 steps of the full mix, where they are a few percent of the tokens; once it
# exists, retrieval is learnt in a few hundred steps. About 450 steps of the recipe.
WARMUP_TASK = "repeat"
WARMUP_SAMPLES = 8000

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
_COUNT_COLOUR_Q = ("What colour are the shapes?", "What color are the shapes?", "Which colour are they?")
_COUNT_SHAPE_Q = ("Which shape is drawn?", "What shape are they?", "What kind of shape is shown?")
_NTH_COLOUR_Q = ("What colour is the shape in the {nth} image?", "What color is the shape in the {nth} image?")
_NTH_SHAPE_Q = ("Which shape is in the {nth} image?", "What shape does the {nth} image show?")
_FRAME_Q = ("Which frame is different?", "Which frame differs from the others?", "Which frame is the odd one out?")
_RETRIEVAL_Q = ("What is the special magic {city} number?", "What is the special magic {city} number?",
                "What is the magic number for {city}?", "Tell me the special magic {city} number.",
                "Which number is the special magic {city} number?")
_REPEAT_Q = ("Repeat this exactly: {s}", "Copy this: {s}", "Say it back: {s}", "Repeat after me: {s}")
_REPEAT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
# the longest retrieval haystack: about 880 byte tokens, so the sample fills a 1,024-token pack
MAX_FILLER_WORDS = 125
_WORDS_PER_EXTRA_NEEDLE = 24


@dataclass
class DemoExample:
    """One question with its media (PIL images, or the frames of one clip) and answer."""

    task: str
    question: str
    answer: str
    images: list = field(default_factory=list)
    frames: list = field(default_factory=list)  # the clip's frames (task 'frame')
    followups: list = field(default_factory=list)  # more (question, answer) turns (training form only)


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


def _jitter(rng: random.Random, size: int) -> int:
    return rng.randint(-size // 16, size // 16)


def shape_image(rng: random.Random, colour: str, shape: str, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    img = _background(rng, size, COLOURS[colour])
    side = rng.randrange(size * 11 // 16, size * 13 // 16 + 1)
    x0, y0 = (size - side) // 2 + _jitter(rng, size), (size - side) // 2 + _jitter(rng, size)
    _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    return img


def _count_image(rng: random.Random, n: int, colour: str, shape: str, size: int) -> Image.Image:
    img = _background(rng, size, COLOURS[colour])
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(4), n)  # a 2x2 grid of places: shapes never overlap
    half = size // 2
    for c in cells:
        side = rng.randrange(half * 7 // 10, half * 8 // 10 + 1)  # narrow: areas of n and n+1 shapes do not overlap
        x0 = (c % 2) * half + (half - side) // 2 + rng.randint(-half // 10, half // 10)
        y0 = (c // 2) * half + (half - side) // 2 + rng.randint(-half // 10, half // 10)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    return img


def _text_image(rng: random.Random, text: str, size: int) -> Image.Image:
    dark = rng.random() < 0.5
    img = Image.new("RGB", (size, size), (20, 20, 20) if dark else (240, 240, 240))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=size * 3 // 5 if len(text) == 1 else size * 2 // 5)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    dx, dy = rng.randint(-size // 24, size // 24), rng.randint(-size // 24, size // 24)
    draw.text(((size - (r - l)) / 2 - l + dx, (size - (b - t)) / 2 - t + dy), text,
              fill=(240, 240, 240) if dark else (15, 15, 15), font=font)
    return img


def _follow(rng: random.Random, ex: DemoExample, turns: list, keep: tuple | None = None) -> None:
    """Append training follow-up turns about the same media, in random order, each kept
    with its probability in ``keep`` (default all) and only when its answer is not already
    in the conversation (a question naming the shape would give the shape away)."""
    turns = [t for i, t in enumerate(turns) if keep is None or rng.random() < keep[i]]
    rng.shuffle(turns)
    said = set(re.findall(r"\w+", (ex.question + " " + ex.answer).lower()))
    for question, answer in turns:
        if not {answer.lower(), answer.lower() + "s"} & said:
            ex.followups.append((question, answer))
            said |= set(re.findall(r"\w+", (question + " " + answer).lower()))


def _insert(text: str, piece: str, at: int) -> str:
    return text[:at] + " " + piece + " " + text[at:]


def _retrieval_example(rng: random.Random, max_filler_words: int, train: bool = False) -> DemoExample:
    # Lengths lean short (words = max * u**3): the copy is learnt cheaply on short
    # haystacks and then holds across the whole trained length. Needles go in at character
    # offsets, as the NIAH grid inserts them at byte-token offsets (mid-word too).
    # Held-out: LongVA's needle task, one needle. Training: a third of the haystacks hold a
    # second city's needle, each asked in its own turn, so the city must be matched; that
    # harder form (`eval niah --distractors N`) is measured apart, it has no target here.
    cities = rng.sample(CITIES, rng.choice((1, 1, 2)) if train else 1)
    # each further needle brings its sentence, question and answer (about 140 byte tokens):
    # the haystack gives up as many words, so every sample fits the 1,024-token pack whole
    words = round((max_filler_words - _WORDS_PER_EXTRA_NEEDLE * (len(cities) - 1)) * rng.random() ** 3)
    text = filler_text(words, rng.random()) if words else ""
    numbers = [magic_number(rng) for _ in cities]
    # offsets drawn in the filler, needles inserted from the back: none lands inside another
    spots = sorted((rng.randrange(len(text) + 1) for _ in cities), reverse=True)
    for at, city, number in zip(spots, cities, numbers):
        text = _insert(text, magic_sentence(city, number), at)
    turns = []
    for city, number in zip(cities, numbers):
        question = rng.choice(_RETRIEVAL_Q).format(city=city)
        if rng.random() < 0.5:
            question += " Answer with the number only."
        turns.append((question, number))
    rng.shuffle(turns)
    (question, answer), followups = turns[0], turns[1:]
    return DemoExample("retrieval", text.strip() + "\n" + question, answer, followups=followups)


def make_example(rng: random.Random, task: str, size: int = DEMO_IMAGE_SIZE,
                 max_filler_words: int = MAX_FILLER_WORDS, train: bool = False) -> DemoExample:
    """One example of ``task`` drawn from ``rng`` (``train``: the training form, see
    ``_retrieval_example``)."""
    if task in ("colour", "shape"):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = shape_image(rng, colour, shape, size)
        q = rng.choice(_COLOUR_Q if task == "colour" else _SHAPE_Q).format(shape=shape)
        ex = DemoExample(task, q, colour if task == "colour" else shape, [img])
        if train:  # every attribute of the picture, so its tokens serve several answers
            _follow(rng, ex, [(rng.choice(_SHAPE_Q), shape), (rng.choice(_COLOUR_Q).format(shape=shape), colour),
                              (rng.choice(_COUNT_Q).format(shape=shape), "1")], keep=(1.0, 1.0, 0.3))
        return ex
    if task == "count":
        n, colour, shape = rng.randint(1, 4), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        q = rng.choice(_COUNT_Q).format(shape=shape)
        ex = DemoExample(task, q, str(n), [_count_image(rng, n, colour, shape, size)])
        if train:
            many = "s are" if n > 1 else " is"
            _follow(rng, ex, [(rng.choice(_COUNT_COLOUR_Q).format(many=many), colour),
                              (rng.choice(_COUNT_SHAPE_Q).format(many=many), shape)])
        return ex
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
        ex = DemoExample(task, q, ORDINALS[target], images)
        if train:  # what another image shows
            other = rng.randrange(k)
            _follow(rng, ex, [(rng.choice(_NTH_COLOUR_Q).format(nth=ORDINALS[other]), pairs[other][0]),
                              (rng.choice(_NTH_SHAPE_Q).format(nth=ORDINALS[other]), pairs[other][1])])
        return ex
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
    if task == "repeat":  # copy a random string: every answer token is a copy (see TASK_WEIGHTS)
        # short strings: a copy circuit forms on short ones within a few hundred steps and
        # then serves retrieval at any distance; strings of up to 48 bytes did not start it
        text = "".join(rng.choice(_REPEAT_CHARS) for _ in range(rng.randrange(3, 21)))
        return DemoExample(task, rng.choice(_REPEAT_Q).format(s=text), text)
    if task == "retrieval":  # LongVA's text needle in filler prose: what `eval niah --mode text` asks
        return _retrieval_example(rng, max_filler_words, train)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _schedule(weights: dict[str, int], videos: bool) -> list[str]:
    """One cycle of training tasks: each task ``weights[task]`` times (``_curriculum`` shuffles it)."""
    bad = set(weights) - set(TASKS)
    if bad:
        raise ValueError(f"weights name unknown task(s) {sorted(bad)}; tasks are {TASKS}")
    cycle = [t for t in TASKS for _ in range(int(weights.get(t, 0))) if videos or t != "frame"]
    if not cycle:
        raise ValueError(f"weights select no task: {weights}")
    return cycle


def demo_picture(seed: int, size: int = DEMO_IMAGE_SIZE) -> tuple[Image.Image, str, str]:
    """The picture ``longvita generate`` shows the demo model by default: one coloured
    shape like those it learnt from, drawn from ``seed``. Returns (image, colour, shape):
    the colour is the right answer to ``DEMO_QUESTION``."""
    rng = random.Random(f"generate-{seed}")
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return shape_image(rng, colour, shape, size), colour, shape


def have_pyav() -> bool:
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


def write_clip(path: Path, frames: list, fps: int = 1) -> None:
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


def _curriculum(rng: random.Random, n_samples: int, warmup: int, weights: dict[str, int], videos: bool) -> list[str]:
    """The task of every sample, in training order: ``warmup`` samples of ``WARMUP_TASK``,
    then cycles of ``weights`` (each cycle shuffled)."""
    cycle = _schedule(weights, videos)
    order = [WARMUP_TASK] * min(warmup, n_samples)
    while len(order) < n_samples:
        rng.shuffle(cycle)
        order += cycle
    return order[:n_samples]


def write_demo_dataset(folder: str | Path, n_samples: int, seed: int = 0, *, videos: bool | None = None,
                       size: int = DEMO_IMAGE_SIZE, weights: dict[str, int] | None = None,
                       warmup: int = WARMUP_SAMPLES) -> Path:
    """Write ``n_samples`` training conversations and their media under ``folder``; returns
    ``folder/manifest.jsonl``. The manifest is in training order (a curriculum, read in
    order by ``longvita train --recipe demo``): first ``warmup`` samples of the copy task
    (``WARMUP_TASK``), then tasks in the proportions of ``weights`` (default
    ``TASK_WEIGHTS``; ``frame`` needs PyAV). Same arguments, same files."""
    if videos is None:
        videos = have_pyav()
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"demo-train-{seed}")
    # the order from its own generator: the first k samples are the same whatever n_samples is
    tasks = _curriculum(random.Random(f"demo-order-{seed}"), n_samples, warmup,
                        TASK_WEIGHTS if weights is None else weights, videos)
    lines = []
    for i in range(n_samples):
        ex = make_example(rng, tasks[i], size, train=True)
        record: dict = {"source": f"demo-{ex.task}"}
        if ex.frames:
            rel = f"media/{i:06d}.mp4"
            write_clip(folder / rel, ex.frames)
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
        for question, answer in ex.followups:
            record["messages"] += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps(record))
    manifest = folder / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest
