"""Inputs: image tiling, video frames, tokenizer and the chat/media token layout, for
each preprocessing family (``long-vita``, ``internvl``; see ``PREPROCESSING.md``); and
training data: JSONL manifests, labelled samples (``training.py``), packs, stage mixtures
and pack streams (``packing.py``), generated sets (``synthetic.py``, ``demo.py``;
docs/architecture.md, "Training data").

Sits beside ``longvita.model`` and does not import it."""

from longvita.data.errors import InputError
from longvita.data.image import (
    DEFAULT_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESS_FAMILIES,
    ImageTiles,
    check_preprocess,
    choose_grid,
    load_image,
    tile_image,
)
from longvita.data.synthetic import write_synthetic_dataset
from longvita.data.template import (
    Conversation,
    MediaSpan,
    PackedPrompt,
    TokenIds,
    build_conversation,
    build_inputs,
    tokens_per_tile,
)
from longvita.data.tokenizer import SPECIAL_TOKENS, SpecialTokens, build_default_tokenizer, load_tokenizer
from longvita.data.packing import Mixture, Pack, PackStream, pack_samples, pack_stream, stage_ratios
from longvita.data.training import (
    IGNORE_INDEX,
    DataWarning,
    MediaConfig,
    Sample,
    TokenizedSample,
    read_manifest,
    tokenize_sample,
    truncate,
)
from longvita.data.video import VideoFrames, VideoWarning, frame_indices, load_video, read_video

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataWarning",
    "MediaConfig",
    "MediaSpan",
    "Mixture",
    "Pack",
    "PackStream",
    "Sample",
    "TokenizedSample",
    "build_conversation",
    "pack_samples",
    "pack_stream",
    "read_manifest",
    "stage_ratios",
    "tokenize_sample",
    "truncate",
    "write_synthetic_dataset",
    "DEFAULT_PREPROCESS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_FAMILIES",
    "ImageTiles",
    "InputError",
    "PackedPrompt",
    "TokenIds",
    "SPECIAL_TOKENS",
    "SpecialTokens",
    "VideoFrames",
    "VideoWarning",
    "build_default_tokenizer",
    "build_inputs",
    "check_preprocess",
    "choose_grid",
    "frame_indices",
    "load_image",
    "load_tokenizer",
    "load_video",
    "read_video",
    "tile_image",
    "tokens_per_tile",
]
