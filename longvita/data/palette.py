"""The colours and shapes every generated picture draws from (the demo set, the synthetic
training set, NIAH's visual needles and ``longvita generate``'s built-in picture): one
palette, so a colour name means the same pixels everywhere."""

from __future__ import annotations

import math

from PIL import ImageDraw

__all__ = ["COLOURS", "SHAPES", "draw_shape"]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (35, 80, 230), "yellow": (235, 215, 20),
           "purple": (140, 40, 185), "orange": (245, 135, 20), "white": (250, 250, 250), "black": (12, 12, 12)}
SHAPES = ("circle", "square", "triangle", "star")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """Draw ``shape`` (one of ``SHAPES``) filling ``box`` = (x0, y0, x1, y1) in ``fill``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        draw.polygon([(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                       cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
