"""The shapes and colours the tiny base model knows, drawn with PIL.

Shared by ``scripts/train_tiny_base.py`` (the base model's procedural training pictures) and
``configs/make_demo_data.py`` (the demo dataset), so that the demo's captions use words the base
model has learned.
"""

from __future__ import annotations

from PIL import ImageDraw

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 215, 40),
    "green": (40, 160, 60), "blue": (40, 80, 210), "purple": (120, 50, 170),
    "pink": (240, 120, 190), "white": (245, 245, 245), "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
               colour: tuple[int, int, int]) -> None:
    """One filled ``shape`` (one of :data:`SHAPES`) inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=max(3, int(w / 6)))
    elif shape == "triangle":
        pen.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=colour)
    elif shape == "diamond":
        pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "cross":
        bar = w / 6
        pen.rectangle((cx - bar, y0, cx + bar, y1), fill=colour)
        pen.rectangle((x0, cy - bar, x1, cy + bar), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
