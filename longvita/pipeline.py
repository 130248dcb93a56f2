"""A model and its tokenizer, loaded together.

The tokenizer decides which ids the image placeholders have, so the model's
``config.image_token_ids`` are set here, when both are loaded, and nowhere else: the
CLI, the runtime and the evaluations all start from ``load_pipeline``. This module sits
above ``longvita.model`` and ``longvita.data`` (it imports both), beside ``parallel``.

Names for the model argument: a checkpoint folder; ``None``, the embedded default (the
trained demo model the package ships, else the tiny preset with random weights); and
``"tiny"``, always the tiny preset with random weights from the seed (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from longvita.data import SpecialTokens, build_default_tokenizer, load_tokenizer
from longvita.model import LongVITA, LongVITAConfig, preset
from longvita.model.checkpoint import CheckpointError, read_config

__all__ = ["Pipeline", "bind_tokenizer", "load_pipeline", "peek_config", "random_tiny_model", "untrained_model"]

DEFAULT_SOURCE = "tiny (random weights)"
DEMO_SOURCE = "demo (trained, embedded)"
TINY = "tiny"  # the name that always gives the random tiny model (tests), unless such a folder exists
EMBEDDED_DEMO = Path(__file__).resolve().parent / "assets" / "demo"
# the built-in byte-level tokenizer's vocabulary: the presets' models built without a checkpoint use it
_DEFAULT_VOCAB = build_default_tokenizer().get_vocab_size()


def embedded_demo_available() -> bool:
    """Whether the package ships the trained demo model (``longvita/assets/demo``)."""
    return (EMBEDDED_DEMO / "config.json").is_file() and (EMBEDDED_DEMO / "model.safetensors").is_file()


def _is_tiny(model_dir) -> bool:
    return model_dir is not None and os.fspath(model_dir) == TINY and not os.path.isdir(TINY)


@dataclass
class Pipeline:
    """A model, its tokenizer and the tokenizer's special-token ids, bound together."""

    model: LongVITA
    tokenizer: Tokenizer
    special: SpecialTokens
    source: str  # the checkpoint folder, DEMO_SOURCE or DEFAULT_SOURCE

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def bind_tokenizer(model: LongVITA, tokenizer: Tokenizer) -> SpecialTokens:
    """Check that ``tokenizer`` fits ``model`` and set the model's placeholder ids from it.

    Raises CheckpointError when the tokenizer can produce ids the model's vocabulary lacks
    (every id must have an embedding row), or InputError when it lacks a special token
    the chat/media layout needs."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    vocab = model.config.text.vocab_size
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= vocab:
        raise CheckpointError(f"the tokenizer has ids up to {largest} but the model's vocabulary has {vocab} rows")
    model.config.image_token_ids = special.context_token_ids
    return special


def random_tiny_model(vocab_size: int = _DEFAULT_VOCAB, seed: int = 0) -> LongVITA:
    """The ``tiny`` preset with random weights drawn from ``seed`` and the given vocabulary
    (by default that of the built-in tokenizer, so every generated id decodes)."""
    torch.manual_seed(seed)
    config = preset("tiny")
    config.text.vocab_size = vocab_size
    model = LongVITA(config).eval()
    with torch.no_grad():  # visible structure in random weights: scale like a trained net
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return model


def untrained_model(name: str, vocab_size: int = _DEFAULT_VOCAB, seed: int = 0) -> LongVITA:
    """Preset ``name`` with the model's own initialisation from ``seed`` (what training
    from scratch starts from, e.g. the ``demo`` recipe)."""
    torch.manual_seed(seed)
    config = preset(name)
    config.text.vocab_size = vocab_size
    config.trained_length = 0  # trained on nothing yet: the trainer records its pack length
    return LongVITA(config).init_weights()


def peek_config(model_dir: str | os.PathLike | None = None, *, untrained: str | None = None) -> LongVITAConfig:
    """The config ``load_pipeline`` with the same arguments would load, validated, without
    reading any weights: what the command line checks lengths against before loading."""
    if _is_tiny(model_dir) or (model_dir is None and untrained is None and not embedded_demo_available()):
        config = preset("tiny")
    elif model_dir is None and untrained is not None:
        config = preset(untrained)
    elif model_dir is None:
        config = read_config(str(EMBEDDED_DEMO))
    else:
        return read_config(os.fspath(model_dir))
    config.text.vocab_size = _DEFAULT_VOCAB
    return config


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
    first, so a broken checkpoint is reported before a missing tokenizer.
    ``untrained="demo"`` (with ``model_dir=None``) gives that preset freshly initialised
    from ``seed`` instead, for training from scratch."""
    tiny = _is_tiny(model_dir)
    if tiny:
        model_dir, untrained = None, None
    if model_dir is None and not tiny and untrained is None and embedded_demo_available():
        # the shipped demo (stored in fp16 to fit the package; computed in fp32 by default)
        model = LongVITA.from_pretrained(str(EMBEDDED_DEMO), dtype=dtype or torch.float32, device=device)
        tokenizer, source = load_tokenizer(str(EMBEDDED_DEMO)), DEMO_SOURCE
    elif model_dir is None:
        tokenizer = build_default_tokenizer()
        if untrained is not None:
            model, source = untrained_model(untrained, tokenizer.get_vocab_size(), seed), f"{untrained} (untrained)"
        else:
            model, source = random_tiny_model(tokenizer.get_vocab_size(), seed), DEFAULT_SOURCE
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        source = os.fspath(model_dir)
        model = LongVITA.from_pretrained(source, dtype=dtype, device=device)
        tokenizer = load_tokenizer(source)
    special = bind_tokenizer(model, tokenizer)
    return Pipeline(model, tokenizer, special, source)
