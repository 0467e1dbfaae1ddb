"""Regenerate ``configs/demo-data/``: the small dataset the local demo trains on.

Twelve small images (96x96 to 160x128, PNG and JPEG), each a different layout of shapes and
colours over its own noise texture, so that none is blurry or a near-duplicate of another and the
quality gate passes them all. Half have a caption sidecar; the demo's template captions the rest.
Deterministic: the same files every time.

    python configs/make_demo_data.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (file name, size, background rgb, shapes, caption or None); a shape is (kind, rgb, box as
# fractions of width/height).
IMAGES = [
    ("01_red_circle.png", (96, 96), (30, 60, 140), [("ellipse", (220, 40, 40), (0.2, 0.2, 0.8, 0.8))],
     "a red circle on a blue textured background"),
    ("02_yellow_square.jpg", (128, 96), (20, 110, 90),
     [("rect", (240, 210, 40), (0.1, 0.15, 0.5, 0.85))], "a yellow square on the left, teal background"),
    ("03_stripes.png", (96, 128), (200, 200, 200), [("stripes", (40, 40, 40), (0, 0, 1, 1))], None),
    ("04_two_dots.jpg", (160, 128), (90, 20, 60),
     [("ellipse", (250, 250, 250), (0.1, 0.3, 0.35, 0.7)),
      ("ellipse", (250, 160, 0), (0.6, 0.2, 0.9, 0.6))], "two dots, white and orange, on plum"),
    ("05_triangle.png", (128, 128), (240, 230, 200), [("triangle", (20, 120, 40), (0.1, 0.1, 0.9, 0.9))],
     None),
    ("06_checker.jpg", (112, 112), (10, 10, 10), [("checker", (230, 60, 160), (0, 0, 1, 1))],
     "a pink and black checkerboard"),
    ("07_ring.png", (144, 112), (250, 120, 30), [("ring", (20, 20, 120), (0.25, 0.1, 0.75, 0.9))], None),
    ("08_cross.jpg", (96, 144), (60, 60, 70), [("cross", (90, 220, 250), (0.1, 0.1, 0.9, 0.9))],
     "a light blue cross on dark grey"),
    ("09_bars.png", (160, 96), (255, 255, 255), [("bars", (200, 30, 30), (0, 0, 1, 1))], None),
    ("10_diamond.jpg", (128, 112), (120, 20, 20), [("diamond", (250, 220, 120), (0.2, 0.1, 0.8, 0.9))],
     "a cream diamond on dark red"),
    ("11_corner_blocks.png", (112, 144), (30, 90, 30),
     [("rect", (250, 250, 60), (0.0, 0.0, 0.4, 0.3)), ("rect", (60, 60, 250), (0.6, 0.7, 1.0, 1.0))],
     None),
    ("12_waves.jpg", (144, 128), (0, 40, 80), [("waves", (120, 230, 200), (0, 0, 1, 1))], None),
]
NOISE = 38  # amplitude of the per-pixel texture: keeps every image sharp by the blur measure


def draw(size: tuple[int, int], background: tuple[int, int, int], shapes: list, seed: int) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        box = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
        if kind == "ellipse":
            pen.ellipse(box, fill=colour)
        elif kind == "rect":
            pen.rectangle(box, fill=colour)
        elif kind == "ring":
            pen.ellipse(box, outline=colour, width=max(4, width // 12))
        elif kind == "triangle":
            pen.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=colour)
        elif kind == "diamond":
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            pen.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)
        elif kind == "cross":
            bar = width // 6
            pen.rectangle((width / 2 - bar, box[1], width / 2 + bar, box[3]), fill=colour)
            pen.rectangle((box[0], height / 2 - bar, box[2], height / 2 + bar), fill=colour)
        elif kind == "stripes":
            for x in range(0, width, 12):
                pen.rectangle((x, 0, x + 5, height), fill=colour)
        elif kind == "bars":
            for y in range(0, height, 20):
                pen.rectangle((0, y, width * (0.3 + 0.7 * (y / height)), y + 8), fill=colour)
        elif kind == "checker":
            step = 16
            for y in range(0, height, step):
                for x in range(0, width, step):
                    if (x // step + y // step) % 2:
                        pen.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
        elif kind == "waves":
            for y0_ in range(0, height, 18):
                points = [(x, y0_ + 6 * np.sin(x / 9.0)) for x in range(width)]
                pen.line(points, fill=colour, width=4)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-NOISE, NOISE + 1, size=pixels.shape[:2] + (1,), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, (name, size, background, shapes, caption) in enumerate(IMAGES):
        image = draw(size, background, shapes, seed)
        path = out_dir / name
        if path.suffix == ".jpg":
            image.save(path, quality=85)
        else:
            image.save(path, optimize=True)
        sidecar = path.with_suffix(".txt")
        if caption:
            sidecar.write_text(caption + "\n", encoding="utf-8")
        elif sidecar.exists():
            sidecar.unlink()
    return 0


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "demo-data"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
