"""LongVA's text needle ("The special magic {city} number is: {7 digits}.") and the filler
prose it hides in, shared by the NIAH evaluation (``longvita.eval.niah.needles``) and the demo
model's retrieval task (``longvita.data.demo``): the demo learns exactly the format the
text NIAH grid asks, so its heatmap on a CPU measures retrieval, not format transfer.
"""

from __future__ import annotations

import random

__all__ = ["CITIES", "FILLER_WORDS", "filler_text", "magic_sentence", "magic_question", "magic_number"]

CITIES = ("Chicago", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Hanoi",
          "Dublin", "Denver", "Seoul", "Porto", "Accra", "Riga")
FILLER_WORDS = (
    "the", "a", "river", "morning", "quietly", "walked", "over", "hills", "and", "market", "stories", "old",
    "garden", "between", "light", "people", "long", "road", "under", "trees", "bright", "window", "city",
    "slowly", "music", "across", "evening", "small", "boats", "harbour", "winter", "paper", "many", "years",
)


def magic_number(rng: random.Random) -> str:
    """A 7-digit number, as LongVA's needles have."""
    return str(rng.randrange(1_000_000, 10_000_000))


def magic_sentence(city: str, number: str) -> str:
    return f"The special magic {city} number is: {number}."


def magic_question(city: str) -> str:
    return f"What is the special magic {city} number?"


def filler_text(n_words: int, seed: int | str = 0) -> str:
    """Deterministic filler prose of ``n_words`` words in sentences of 6-13 words."""
    rng = random.Random(seed)
    sentences, left = [], n_words
    while left > 0:
        k = min(left, rng.randrange(6, 14))
        words = [rng.choice(FILLER_WORDS) for _ in range(k)]
        sentences.append(" ".join(words).capitalize() + ".")
        left -= k
    return " ".join(sentences)
