"""Inputs: image tiling, video frames, tokenizer and the chat/media token layout, for
each preprocessing family (``long-vita``, ``internvl``; see ``PREPROCESSING.md``).

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
from longvita.data.template import PackedPrompt, build_inputs, tokens_per_tile
from longvita.data.tokenizer import SPECIAL_TOKENS, SpecialTokens, build_default_tokenizer, load_tokenizer
from longvita.data.video import VideoFrames, VideoWarning, frame_indices, load_video, read_video

__all__ = [
    "DEFAULT_PREPROCESS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_FAMILIES",
    "ImageTiles",
    "InputError",
    "PackedPrompt",
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
