"""Inputs: image tiling, video frames, tokenizer and the Long-VITA chat/media token layout.

Sits beside ``longvita.model`` and does not import it."""

from longvita.data.errors import InputError
from longvita.data.image import IMAGENET_MEAN, IMAGENET_STD, ImageTiles, choose_grid, load_image, tile_image
from longvita.data.template import PackedPrompt, build_inputs, tokens_per_tile
from longvita.data.tokenizer import SPECIAL_TOKENS, SpecialTokens, build_default_tokenizer, load_tokenizer
from longvita.data.video import load_video, select_frames

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTiles",
    "InputError",
    "PackedPrompt",
    "SPECIAL_TOKENS",
    "SpecialTokens",
    "build_default_tokenizer",
    "build_inputs",
    "choose_grid",
    "load_image",
    "load_tokenizer",
    "load_video",
    "select_frames",
    "tile_image",
    "tokens_per_tile",
]
