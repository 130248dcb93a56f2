"""Choosing the next token from one row of logits: greedy, or temperature with top-k and
top-p (nucleus) filtering, drawn from a seeded generator so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """``temperature=0``: greedy (top_k and top_p are then unused). ``top_k=0``: no top-k
    cut; ``top_p=1``: no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """logits (V,) -> the chosen token id."""
        if self.temperature == 0:
            return int(logits.argmax())
        scores = logits.float() / self.temperature
        if self.top_k and self.top_k < scores.numel():
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, -1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            # (the most likely token always stays)
            drop = torch.cumsum(probs, -1) - probs >= self.top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, -float("inf")))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=generator))
