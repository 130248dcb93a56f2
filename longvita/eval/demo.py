"""Accuracy of a model on the demo tasks' held-out examples (``longvita eval demo``).

Each example is asked as ``longvita generate`` asks it (the media, then the question in
one user turn) and answered greedily; it is right when the generated text, stripped,
equals the answer. Clips go through an mp4 file and ``read_video`` as in training.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from longvita.data.demo import TASKS, DemoExample, have_pyav, write_clip, demo_examples
from longvita.data.image import tile_image
from longvita.data.template import build_inputs
from longvita.runtime.generation import generate

__all__ = ["evaluate_demo", "answer"]


def _segments(example: DemoExample, image_size: int, preprocess: str, tmp: Path) -> list:
    from longvita.data.video import read_video

    if example.frames:
        path = tmp / "clip.mp4"
        write_clip(path, example.frames)
        video = read_video(path, image_size=image_size, preprocess=preprocess, raw=True)
        return [video.pixel_values, "\n" + example.question]
    if example.images:
        tiles = [tile_image(img, image_size=image_size, preprocess=preprocess) for img in example.images]
        return [*tiles, "\n" + example.question]
    return [example.question]


@torch.no_grad()
def answer(pipe, example: DemoExample, max_new_tokens: int = 8, tmp: Path | None = None) -> str:
    """The model's greedy answer to one example."""
    cfg = pipe.model.config
    with tempfile.TemporaryDirectory() as scratch:
        segments = _segments(example, cfg.vision.image_size, cfg.preprocess, Path(tmp or scratch))
        prompt = build_inputs(pipe.tokenizer, pipe.special, segments, tokens_per_tile=cfg.tokens_per_tile,
                              preprocess=cfg.preprocess)
    ids = list(generate(pipe.model, prompt.input_ids, prompt.pixel_values, max_new_tokens=max_new_tokens,
                        eos_token_id=pipe.special.eos_token_id))
    if ids and ids[-1] == pipe.special.eos_token_id:
        ids = ids[:-1]
    return pipe.tokenizer.decode(ids).strip()


def evaluate_demo(pipe, n_per_task: int = 20, seed: int = 0, tasks: tuple[str, ...] | None = None,
                  progress: Callable[[], None] | None = None) -> dict:
    """Accuracy per task on ``n_per_task`` held-out examples of each task (the ``frame``
    task only with PyAV). Returns {task: {"accuracy", "n", "wrong": [(question, answer, got)]}}."""
    tasks = tasks or tuple(t for t in TASKS if t != "frame" or have_pyav())
    examples = demo_examples(n_per_task, seed, tasks, size=pipe.model.config.vision.image_size)
    right, wrong = defaultdict(int), defaultdict(list)
    for ex in examples:
        # room for the whole answer and a few tokens more: an answer that runs on is wrong
        budget = len(pipe.tokenizer.encode(ex.answer, add_special_tokens=False).ids) + 4
        got = answer(pipe, ex, max_new_tokens=budget)
        if got == ex.answer:
            right[ex.task] += 1
        else:
            wrong[ex.task].append((ex.question[-80:], ex.answer, got))
        if progress is not None:
            progress()
    return {t: {"accuracy": right[t] / n_per_task, "n": n_per_task, "wrong": wrong[t][:5]} for t in tasks}
