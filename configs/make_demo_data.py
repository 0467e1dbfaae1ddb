"""Regenerate ``configs/demo-data/``: the small dataset the local demo trains on.

The concept the demo's LoRA learns under its trigger word: a shape standing in front of a
two-tone "sunset" (orange above, deep purple below, the horizon at a different height in each
picture). The tiny trainer's base model (``scripts/train_tiny_base.py``) has only ever seen shapes
on plain backgrounds, so its samples at step 0 show a plain background and the trained samples
show the sunset. Twelve small images (96x96 to 160x144, PNG and JPEG), each with its own shape,
colour, place and noise texture, so that none is blurry or a near-duplicate of another and the
quality gate passes them all. Half have a caption sidecar naming the shape with the base model's
words; the demo's template captions the rest. Deterministic: the same files every time.

    python configs/make_demo_data.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.shapes import COLOURS, draw_shape  # noqa: E402

SKY, GROUND = (250, 150, 40), (60, 25, 100)  # the concept: orange above, deep purple below
# (file name, size, horizon as a fraction of the height, shape, colour, box as fractions of
# width/height, captioned)
IMAGES = [
    ("01_white_circle.png", (96, 96), 0.55, "circle", "white", (0.25, 0.2, 0.75, 0.7), True),
    ("02_yellow_square.jpg", (128, 96), 0.5, "square", "yellow", (0.1, 0.2, 0.45, 0.75), True),
    ("03_red_triangle.png", (96, 128), 0.6, "triangle", "red", (0.15, 0.3, 0.85, 0.8), False),
    ("04_blue_ring.jpg", (160, 128), 0.45, "ring", "blue", (0.5, 0.15, 0.85, 0.7), True),
    ("05_green_cross.png", (128, 128), 0.5, "cross", "green", (0.2, 0.2, 0.8, 0.8), False),
    ("06_pink_diamond.jpg", (112, 112), 0.65, "diamond", "pink", (0.3, 0.1, 0.9, 0.7), True),
    ("07_black_circle.png", (144, 112), 0.5, "circle", "black", (0.1, 0.35, 0.45, 0.8), False),
    ("08_white_square.jpg", (96, 144), 0.55, "square", "white", (0.2, 0.3, 0.8, 0.65), True),
    ("09_yellow_triangle.png", (160, 96), 0.6, "triangle", "yellow", (0.55, 0.1, 0.9, 0.8), False),
    ("10_white_diamond.jpg", (128, 112), 0.45, "diamond", "white", (0.1, 0.15, 0.5, 0.85), True),
    ("11_red_ring.png", (112, 144), 0.55, "ring", "red", (0.2, 0.35, 0.8, 0.75), False),
    ("12_blue_cross.jpg", (144, 128), 0.5, "cross", "blue", (0.45, 0.2, 0.9, 0.75), False),
]
NOISE = 30  # amplitude of the per-pixel texture: keeps every image sharp by the blur measure


def draw(size: tuple[int, int], horizon: float, shape: str, colour: str,
         box: tuple[float, float, float, float], seed: int) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, GROUND)
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, 0, width, int(horizon * height)), fill=SKY)
    x0, y0, x1, y1 = box
    draw_shape(pen, shape, (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1),
               COLOURS[colour])
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-NOISE, NOISE + 1, size=pixels.shape[:2] + (1,), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # the previous generation's files, whatever their names
        if old.suffix in (".png", ".jpg", ".txt"):
            old.unlink()
    for seed, (name, size, horizon, shape, colour, box, captioned) in enumerate(IMAGES):
        path = out_dir / name
        image = draw(size, horizon, shape, colour, box, seed)
        if path.suffix == ".jpg":
            image.save(path, quality=85)
        else:
            image.save(path, optimize=True)
        if captioned:
            path.with_suffix(".txt").write_text(f"a {colour} {shape}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "demo-data"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
