"""A model and its tokenizer, loaded together.

The tokenizer decides which ids the image placeholders have, so the model's
``config.image_token_ids`` are set here, when both are loaded, and nowhere else: the
CLI, the context-parallel runtime and the trainer all start from ``load_pipeline``.
This module sits above ``longvita.model`` and ``longvita.data`` (it imports both);
``longvita.dist`` and the CLI build on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from longvita.data import SpecialTokens, build_default_tokenizer, load_tokenizer
from longvita.model import LongVITA, preset

__all__ = ["Pipeline", "bind_tokenizer", "load_pipeline", "random_demo_model"]

DEFAULT_SOURCE = "tiny (random weights)"
DEMO_SOURCE = "demo (trained, embedded)"
TINY = "tiny"  # the name that always gives the random tiny model (tests), unless such a folder exists
EMBEDDED_DEMO = Path(__file__).resolve().parent / "assets" / "demo"


def embedded_demo_available() -> bool:
    """Whether the package ships the trained demo model (``longvita/assets/demo``)."""
    return (EMBEDDED_DEMO / "config.json").is_file() and (EMBEDDED_DEMO / "model.safetensors").is_file()


@dataclass
class Pipeline:
    """A model, its tokenizer and the tokenizer's special-token ids, bound together."""

    model: LongVITA
    tokenizer: Tokenizer
    special: SpecialTokens
    source: str  # the checkpoint folder, or DEFAULT_SOURCE

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def bind_tokenizer(model: LongVITA, tokenizer: Tokenizer) -> SpecialTokens:
    """Check that ``tokenizer`` fits ``model`` and set the model's placeholder ids from it.

    Raises ValueError when the tokenizer can produce ids the model's vocabulary lacks
    (every id must have an embedding row), or InputError when it lacks a special token
    the chat/media layout needs."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    vocab = model.config.text.vocab_size
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= vocab:
        raise ValueError(
            f"the tokenizer has ids up to {largest} but the model's vocabulary has {vocab} rows"
        )
    model.config.image_token_ids = special.context_token_ids
    return special


def random_demo_model(vocab_size: int, seed: int = 0) -> LongVITA:
    """The ``tiny`` preset with random weights drawn from ``seed`` and the given vocabulary
    (that of the built-in tokenizer, so every generated id decodes)."""
    torch.manual_seed(seed)
    config = preset("tiny")
    config.text.vocab_size = vocab_size
    model = LongVITA(config).eval()
    with torch.no_grad():  # visible structure in random weights: scale like a trained net
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return model


def untrained_model(name: str, vocab_size: int, seed: int = 0) -> LongVITA:
    """Preset ``name`` with the model's own initialisation from ``seed`` (what training
    from scratch starts from, e.g. the ``demo`` recipe)."""
    torch.manual_seed(seed)
    config = preset(name)
    config.text.vocab_size = vocab_size
    return LongVITA(config).init_weights()


def load_pipeline(
    model_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    untrained: str | None = None,
) -> Pipeline:
    """Load a checkpoint folder (weights, config and ``tokenizer.json``), or with
    ``model_dir=None`` the embedded default: the trained demo model the package ships
    (``longvita/assets/demo``), else the tiny preset with random weights from ``seed``;
    ``model_dir="tiny"`` always gives that random tiny model (tests). Weights are read
    first, so a broken checkpoint is reported before a missing tokenizer. ``untrained="demo"`` (with ``model_dir=None``)
    gives that preset freshly initialised from ``seed`` instead, for training from scratch."""
    if model_dir is not None and os.fspath(model_dir) == TINY and not os.path.isdir(TINY):
        model_dir, untrained = None, None
        tiny = True
    else:
        tiny = False
    if model_dir is None and not tiny and untrained is None and embedded_demo_available():
        # the shipped demo (stored in fp16 to fit the package; computed in fp32 by default)
        model = LongVITA.from_pretrained(str(EMBEDDED_DEMO), dtype=dtype or torch.float32, device=device)
        tokenizer = load_tokenizer(str(EMBEDDED_DEMO))
        special = bind_tokenizer(model, tokenizer)
        return Pipeline(model, tokenizer, special, DEMO_SOURCE)
    if model_dir is None and untrained is not None:
        tokenizer = build_default_tokenizer()
        model = untrained_model(untrained, tokenizer.get_vocab_size(), seed).to(device=device, dtype=dtype or torch.float32)
        source = f"{untrained} (untrained)"
    elif model_dir is None:
        tokenizer = build_default_tokenizer()
        model = random_demo_model(tokenizer.get_vocab_size(), seed)
        model = model.to(device=device, dtype=dtype or torch.float32)
        source = DEFAULT_SOURCE
    else:
        source = os.fspath(model_dir)
        model = LongVITA.from_pretrained(source, dtype=dtype, device=device)
        tokenizer = load_tokenizer(source)
    special = bind_tokenizer(model, tokenizer)
    return Pipeline(model, tokenizer, special, source)
