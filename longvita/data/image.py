"""Image loading and Long-VITA / InternVL dynamic tiling.

Two preprocessing families exist (``PREPROCESS_FAMILIES``); a checkpoint must see the
pixels and token layout it was trained with, so the family is recorded in the model
config when a checkpoint loads and can be overridden by name. ``PREPROCESSING.md`` in
this package lists each family's steps and where they were read.

What this module does, precisely (so it can be checked against a trained checkpoint):

1. Grid choice = InternVL's ``dynamic_preprocess`` (Long-VITA uses the same function):
   the candidate grids are every (cols, rows) with ``min_num <= cols*rows <= max_num``,
   built as the same Python set and stably sorted by ``cols*rows``; the grid whose aspect
   ratio ``cols/rows`` is closest to ``width/height`` wins, and on an exact tie a later
   candidate replaces the earlier one only if ``width*height > 0.5 * image_size**2 *
   cols*rows`` (a large image prefers more tiles). The order of equal-area candidates is
   CPython's set iteration order, which is deterministic for small int tuples; it is kept
   on purpose because it decides exact ties between equal-area grids (only possible with
   min_num > 1, e.g. a 5:4 image between 2x1 and 1x2 when min_num=2, max_num=3), and
   checkpoints were trained with it. The grid is chosen from the image's ORIGINAL size,
   even when ``load_image`` decoded a reduced copy of a very large file.
2. Grid tiles: the whole image is resized (bicubic, no padding: the grid already
   matches the aspect ratio) to ``(image_size*cols, image_size*rows)`` and cut into
   ``image_size`` squares, row-major.
3. Thumbnail / single tile: the whole image squashed (bicubic resize to
   ``image_size x image_size``, aspect ratio not kept, no padding), as both families'
   own code does. A 1x1 grid yields just this one tile and no thumbnail. When the grid
   has more than one tile the thumbnail comes FIRST for ``long-vita`` (Long-VITA's
   ``dynamic_preprocess`` prepends it) and LAST for ``internvl`` (InternVL and
   transformers' ``GotOcr2ImageProcessor`` append it).
4. Every tile: RGB -> float32 in [0, 1] -> ImageNet mean/std normalisation, (3, S, S).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from longvita.data.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Long-VITA's background for padding video frames to square: ``int(m * 255)`` of the
# ImageNet mean, truncated as its ``process_images`` does -> (123, 116, 103)
IMAGENET_MEAN_RGB = tuple(int(m * 255) for m in IMAGENET_MEAN)

LONG_VITA = "long-vita"
INTERNVL = "internvl"
PREPROCESS_FAMILIES = (LONG_VITA, INTERNVL)
DEFAULT_PREPROCESS = LONG_VITA

# A very large image is decoded at a reduced size, but only while the reduced copy keeps
# at least this many pixels per output pixel in each direction: the bicubic resize that
# follows then still averages over a wide enough footprint that the tiles barely change
# (Pillow's own ``reducing_gap`` guidance: 3 is close to exact resampling).
REDUCING_GAP = 3

__all__ = [
    "DEFAULT_PREPROCESS",
    "IMAGENET_MEAN",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD",
    "INTERNVL",
    "LONG_VITA",
    "PREPROCESS_FAMILIES",
    "ImageTiles",
    "candidate_grids",
    "check_preprocess",
    "choose_grid",
    "load_image",
    "original_size",
    "pad_to_square",
    "squash_tile",
    "normalize",
    "to_tensor",
    "to_uint8",
    "tile_image",
]


def check_preprocess(name: str, argument: str = "preprocess") -> str:
    """Return ``name`` if it is a known preprocessing family, else raise ValueError naming
    ``argument`` and the known names."""
    if name not in PREPROCESS_FAMILIES:
        raise ValueError(f"{argument} must be one of {list(PREPROCESS_FAMILIES)}, got {name!r}")
    return name


@dataclass
class ImageTiles:
    """One image cut into tiles, in the order their context tokens appear.

    pixel_values: float32 ``(n_tiles, 3, S, S)``; ``n_tiles = 1 + rows*cols`` when
        ``has_thumbnail`` (``long-vita``: thumbnail first, then grid tiles row-major;
        ``internvl``: grid tiles row-major, then the thumbnail), else 1.
    grid: ``(rows, cols)`` of the grid tiles; ``(1, 1)`` for a single-tile image.
    has_thumbnail: True when pixel_values holds a thumbnail besides the grid tiles.
    preprocess: the family whose tile order (and token layout) these tiles follow.
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int]
    has_thumbnail: bool
    preprocess: str = DEFAULT_PREPROCESS

    def __post_init__(self):
        check_preprocess(self.preprocess, "ImageTiles.preprocess")
        pv, (rows, cols) = self.pixel_values, self.grid
        if pv.dim() != 4 or pv.shape[1] != 3 or pv.shape[2] != pv.shape[3]:
            raise ValueError(f"ImageTiles.pixel_values must be (n_tiles, 3, S, S), got {tuple(pv.shape)}")
        expected = 1 + rows * cols if self.has_thumbnail else 1
        if not self.has_thumbnail and (rows, cols) != (1, 1):
            raise ValueError(f"ImageTiles without a thumbnail must have grid (1, 1), got {self.grid}")
        if pv.shape[0] != expected:
            raise ValueError(
                f"ImageTiles with grid {self.grid} and has_thumbnail={self.has_thumbnail} needs "
                f"{expected} tiles, got {pv.shape[0]}"
            )

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def _reduced(image: Image.Image) -> tuple[int, int, int] | None:
    """``(W, H, factor)`` when ``image`` is a reduced decode made by ``load_image``, else
    None. Pillow copies ``info`` through ``convert`` but also through ``crop`` and
    friends, so the record counts only while the size still matches it."""
    size, factor = image.info.get("original_size"), image.info.get("reduced_by")
    if not size or not factor:
        return None
    w, h = size
    if image.size != (-(-w // factor), -(-h // factor)):
        return None
    return w, h, factor


def original_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the file an image was decoded from: ``load_image`` records it
    in ``image.info["original_size"]`` when it decoded a reduced copy; otherwise (or once
    the image was cropped or resized since) the image's own size."""
    reduced = _reduced(image)
    return reduced[:2] if reduced else image.size


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize of the whole picture. For a reduced decode the source box is the
    original extent in reduced pixels (``W / factor``): the last row and column of a
    reduction by a factor that does not divide the size are partial, and resizing the
    full reduced image would stretch the picture by up to a reduced pixel (Pillow's own
    ``reducing_gap`` path passes the same box)."""
    reduced = _reduced(image)
    box = None
    if reduced and image.size != tuple(size):
        w, h, factor = reduced
        box = (0.0, 0.0, w / factor, h / factor)
    return image.resize(tuple(size), Image.Resampling.BICUBIC, box=box)


def _needed_canvas(size: tuple[int, int], image_size: int, min_num: int, max_num: int) -> tuple[int, int]:
    # the largest thing resized from the full image: the grid canvas (the thumbnail,
    # image_size square, is never larger in either direction)
    rows, cols = choose_grid(*size, image_size=image_size, min_num=min_num, max_num=max_num)
    return image_size * cols, image_size * rows


def _reduction(have: tuple[int, int], need: tuple[int, int]) -> int:
    return max(1, min(have[0] // (REDUCING_GAP * need[0]), have[1] // (REDUCING_GAP * need[1])))


def load_image(path: str | Path, *, image_size: int = 448, min_num: int = 1, max_num: int = 12) -> Image.Image:
    """Open an image file fully decoded as RGB (alpha is dropped; EXIF orientation is
    not applied, matching InternVL / Long-VITA preprocessing).

    A file far larger than its tiles need (more than ``REDUCING_GAP`` times the grid
    canvas that ``tile_image`` with the same ``image_size``/``min_num``/``max_num``
    resizes to, in both directions) is decoded reduced, so memory and time stay bounded:
    JPEG through the decoder's DCT scaling (``Image.draft``), other formats by an integer
    box reduction (``Image.reduce``) after decoding. The original size is then kept in
    ``image.info["original_size"]`` (the reduction factor in ``"reduced_by"``):
    ``tile_image`` chooses the grid from it and resizes from the original extent. Smaller
    files decode exactly as ``Image.open(path).convert("RGB")``.

    Raises InputError naming the file if it is missing, not a file, not a decodable image
    (including truncated data: decoding is forced here, not later), or larger than
    Pillow's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"image path {str(path)!r} is not a file")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    candidate_grids(min_num, max_num)  # bad options fail here, not as a "corrupt file" below
    try:
        # Pillow warns above MAX_IMAGE_PIXELS; large files are handled here by decoding
        # them reduced, so the warning would only be noise on the user's terminal
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
                need = _needed_canvas(size, image_size, min_num, max_num)
                factor = _reduction(size, need)
                scale = 1
                if factor > 1 and img.format == "JPEG":
                    # the decoder picks the largest power-of-two scale that keeps at
                    # least the requested size; its output is ceil(W / scale) wide
                    img.draft("RGB", (math.ceil(size[0] / factor), math.ceil(size[1] / factor)))
                    scale = next((a for a in (8, 4, 2) if img.size == (-(-size[0] // a), -(-size[1] // a))), 1)
                img.load()  # PIL decodes lazily; force it so corrupt data fails here
                out = img.convert("RGB")
            rest = _reduction(out.size, need) if factor > 1 else 1
            if rest > 1:
                out = out.reduce(rest)
            if scale * rest > 1:
                out.info["original_size"] = size
                out.info["reduced_by"] = scale * rest
            return out
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"image file {str(path)!r} is too large to decode safely ({exc}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"image file {str(path)!r} is not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / malformed payloads
        raise InputError(f"image file {str(path)!r} is corrupt or unreadable: {exc}") from None


def _grid_insertions(min_num: int, max_num: int):
    """The (cols, rows) pairs in the order InternVL's set comprehension
    ``{(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in
    range(1, n + 1) if min_num <= i * j <= max_num}`` first inserts them (a pair first
    appears at n = max(i, j, min_num), in (i, j) order), without its O(max_num**3) loop:
    O(max_num log max_num). The same insertions give the same set, hence the same order."""
    for i in range(1, min_num + 1):  # first seen at n = min_num
        for j in range(1, min_num + 1):
            if min_num <= i * j <= max_num:
                yield i, j
    for n in range(min_num + 1, max_num + 1):  # first seen at n = max(i, j) > min_num
        low = -(-min_num // n)  # the smallest partner with i * n >= min_num
        for i in range(low, min(n - 1, max_num // n) + 1):
            yield i, n
        for j in range(low, min(n, max_num // n) + 1):
            yield n, j


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """(cols, rows) candidates with min_num <= cols*rows <= max_num, in InternVL's order
    (the same set stably sorted by area; see the module docstring for why)."""
    if not (isinstance(min_num, int) and isinstance(max_num, int) and 1 <= min_num <= max_num):
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    return sorted(set(_grid_insertions(min_num, max_num)), key=lambda r: r[0] * r[1])


def choose_grid(width: int, height: int, *, image_size: int = 448, min_num: int = 1, max_num: int = 12) -> tuple[int, int]:
    """Return the ``(rows, cols)`` grid InternVL's dynamic preprocessing picks for an
    image of ``width x height`` pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)  # (cols, rows)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # exact tie: a large enough image takes the later (larger-or-equal area) grid
            best = (cols, rows)
    return best[1], best[0]


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image (as RGB) on a square canvas of colour ``fill`` (Long-VITA's
    ``expand2square``: offset ``(side - w) // 2``, ``(side - h) // 2``)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> its pixels as a uint8 tensor (3, H, W), not normalised (a quarter
    of float32's memory: how video frames wait for the vision tower)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> ImageNet-normalised float32, on their device:
    ``(x / 255 - mean) / std`` in float32. The vision encoder does the same to uint8 input."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ImageNet-normalised float32 tensor (3, H, W)."""
    return normalize(to_uint8(image))


def squash_tile(image: Image.Image, image_size: int, *, raw: bool = False) -> torch.Tensor:
    """Resize the whole image bicubic to ``image_size`` square (aspect ratio not kept),
    normalise -> (3, S, S) (``raw=True``: its uint8 pixels). The thumbnail and a
    single-tile image, in both families."""
    pixels = to_uint8(_resize(image.convert("RGB"), (image_size, image_size)))
    return pixels if raw else normalize(pixels)


def tile_image(
    image: Image.Image,
    *,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    preprocess: str = DEFAULT_PREPROCESS,
) -> ImageTiles:
    """Cut an image into dynamic tiles (see the module docstring).

    Returns ImageTiles with pixel_values float32 ``(n_tiles, 3, image_size, image_size)``:
    the thumbnail and ``rows*cols`` grid tiles in ``preprocess``'s order, or one squashed
    tile for a 1x1 grid. (No option to drop the thumbnail: both families always use it.)"""
    check_preprocess(preprocess)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image = image.convert("RGB")
    rows, cols = choose_grid(*original_size(image), image_size=image_size, min_num=min_num, max_num=max_num)
    if rows * cols == 1:
        return ImageTiles(squash_tile(image, image_size).unsqueeze(0), (1, 1), False, preprocess)

    resized = _resize(image, (image_size * cols, image_size * rows))
    big = to_tensor(resized)  # (3, rows*S, cols*S)
    # (3, rows, S, cols, S) -> (rows, cols, 3, S, S): row-major tiles, same as cropping boxes
    grid = big.view(3, rows, image_size, cols, image_size).permute(1, 3, 0, 2, 4)
    tiles = grid.reshape(rows * cols, 3, image_size, image_size)
    thumbnail = squash_tile(image, image_size).unsqueeze(0)
    ordered = [thumbnail, tiles] if preprocess == LONG_VITA else [tiles, thumbnail]
    return ImageTiles(torch.cat(ordered), (rows, cols), True, preprocess)
