"""One NIAH cell's whole sequence, laid out by the chat template builder
(``longvita.data.build_conversation``): a user turn (haystack with the needle, then the
question) and an assistant turn (the answer), whose tokens are the ones scored."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from longvita.data import TokenIds, build_conversation
from longvita.data.errors import InputError
from longvita.eval.niah.haystack import TextHaystack
from longvita.eval.niah.needles import TextNeedle, VisualNeedle, distractors

__all__ = ["CellInputs", "text_cell", "visual_cell"]

TEXT_INSTRUCTION = " Answer with the number only."
VISUAL_INSTRUCTION = " Answer with one word or number."


@dataclass
class CellInputs:
    """One cell's whole sequence. answer_positions: where the answer tokens sit (each is
    predicted by the row before it). frame_sources: per media frame, the haystack frame it
    shows, or -1 for the needle (visual only)."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    needle_span: tuple[int, int]
    frame_sources: list[int] = field(default_factory=list)


def _through_answer(conv) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell's ids up to the answer's <|im_end|> (nothing after it is scored) and where
    the answer tokens sit (not the <|im_end|>)."""
    targets = conv.target_mask.nonzero().squeeze(1)
    return conv.input_ids[: int(targets[-1]) + 1], targets[:-1]


def text_cell(tokenizer, special, haystack: TextHaystack, needle: TextNeedle, depth: float, context_tokens: int,
              n_distractors: int = 0, seed: int = 0) -> CellInputs:
    """User turn: ``context_tokens`` minus the rest of the cell of haystack tokens, with the
    needle sentence at ``depth`` % of them (distractor sentences at seeded depths), then the
    question; assistant turn: the answer."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    needle_ids = encode(" " + needle.sentence + " ")
    extra = [encode(" " + s + " ") for s in distractors(needle, n_distractors, seed)]
    question = "\n" + needle.question + TEXT_INSTRUCTION

    def layout(hay: list[int]):
        return build_conversation(tokenizer, special, [("user", [TokenIds(hay), question]), ("assistant", [needle.answer])],
                                  tokens_per_tile=1, pixels=False)

    # what the cell holds besides the haystack: the template, the question, the answer
    fixed = _through_answer(layout([]))[0].numel() + len(needle_ids) + sum(map(len, extra))
    n_hay = context_tokens - fixed
    if n_hay < 1:
        raise InputError(f"--context {context_tokens} is too short: the needle, question and answer take {fixed} tokens")
    if n_hay > haystack.ids.numel():
        raise InputError(f"the haystack has {haystack.ids.numel()} tokens; a {context_tokens}-token cell needs {n_hay}")
    hay = haystack.ids[:n_hay].tolist()
    at = round(depth / 100 * n_hay)
    # distractors at seeded depths away from the needle (inserted from the back, so the
    # needle's offset only moves by those placed before it)
    rng = random.Random(f"{seed}-{needle.id}-{context_tokens}-{depth}")
    spots = sorted(((rng.randrange(0, n_hay + 1), d) for d in extra), key=lambda t: -t[0])
    shift = 0
    for spot, d in spots:
        hay[spot:spot] = d
        if spot <= at:
            shift += len(d)
    at += shift
    hay[at:at] = needle_ids
    conv = layout(hay)
    start = conv.token_spans[0][0] + at
    return CellInputs(*_through_answer(conv), (start, start + len(needle_ids)))


def visual_cell(tokenizer, special, config, needle: VisualNeedle, depth: float, n_frames: int,
                preprocess: str) -> CellInputs:
    """User turn: ``n_frames`` video frames (haystack frames 0..n-1, the one at ``depth``
    replaced by the needle), then the question; assistant turn: the answer. The frames are
    laid out by count only (their features come from the cache)."""
    v = config.vision
    stand_in = torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=torch.uint8).expand(n_frames, -1, -1, -1)
    conv = build_conversation(
        tokenizer, special,
        [("user", [stand_in, "\n" + needle.question + VISUAL_INSTRUCTION]), ("assistant", [needle.answer])],
        tokens_per_tile=config.tokens_per_tile, preprocess=preprocess, pixels=False,
    )
    needle_frame = round(depth / 100 * (n_frames - 1))
    slots = torch.isin(conv.input_ids, torch.tensor(special.context_token_ids)).nonzero().squeeze(1)
    n = config.tokens_per_tile
    span = (int(slots[needle_frame * n]), int(slots[needle_frame * n + n - 1]) + 1)
    sources = [-1 if f == needle_frame else f for f in range(n_frames)]
    return CellInputs(*_through_answer(conv), span, sources)
