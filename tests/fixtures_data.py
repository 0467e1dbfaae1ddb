"""Shared dataset fixtures (loaded by conftest.py via pytest_plugins). Everything is generated
in ``tmp_path``, seeded, in well under a second.

``small_dataset`` -> ``Path``: a folder of 12 good, distinct, sharp 320x256 JPEGs
    ``img_00.jpg`` .. ``img_11.jpg``; ``img_00``..``img_03`` have ``.txt`` captions that contain
    the trigger word :data:`TRIGGER` (``img_01.txt`` uses the ``[trigger]`` placeholder), the
    rest have none. It passes the default quality gate (12 usable, nothing flagged but
    ``missing_caption`` before captioning).

``hostile_dataset`` -> :class:`HostileDataset`: a folder where hostile input is the normal case.
    ``.dir`` the folder, ``.outside`` a valid image outside it (the target of a symlink),
    ``.expected`` file name -> the gate category it must land in (None: usable, no category but
    possibly ``missing_caption``), ``.orphan`` the caption without an image, ``.captions`` file
    name -> the exact caption bytes written, ``.rotated`` the EXIF orientation-6 photo (stored
    400x300, shown 300x400), ``.symlink`` the link that points outside, ``.hostile_name`` the
    file named ``$(touch pwned).jpg``.

:func:`make_photo` draws one seeded synthetic "photo" (shapes + texture) for tests that need more.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

TRIGGER = "p3r5on"


def make_photo(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A sharp synthetic picture whose low frequencies (and so pHash) depend on ``seed``."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    base = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    arr = np.asarray(base, dtype=np.int16) + rng.normal(0, 12, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **kwargs)
    return buf.getvalue()


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "small_dataset"
    folder.mkdir()
    for i in range(12):
        make_photo(100 + i).save(folder / f"img_{i:02d}.jpg", quality=92)
    (folder / "img_00.txt").write_text(f"{TRIGGER} standing in a park", encoding="utf-8")
    (folder / "img_01.txt").write_text("[trigger] at the beach, wide shot", encoding="utf-8")
    (folder / "img_02.txt").write_text(f"close-up of {TRIGGER}, studio light", encoding="utf-8")
    (folder / "img_03.txt").write_text(f"{TRIGGER} reading a book\n", encoding="utf-8")
    return folder


@dataclass
class HostileDataset:
    dir: Path
    outside: Path
    symlink: str
    hostile_name: str
    rotated: str
    orphan: str
    expected: dict[str, str | None] = field(default_factory=dict)
    captions: dict[str, bytes] = field(default_factory=dict)


def make_hostile_dataset(root: Path) -> HostileDataset:
    folder = root / "hostile"
    folder.mkdir()
    outside_dir = root / "outside"
    outside_dir.mkdir()
    outside = outside_dir / "secret.jpg"
    make_photo(999).save(outside, quality=90)

    expected: dict[str, str | None] = {}
    for i in range(6):
        make_photo(i).save(folder / f"good_{i:02d}.jpg", quality=92)
        expected[f"good_{i:02d}.jpg"] = None
    good0 = (folder / "good_00.jpg").read_bytes()

    (folder / "truncated.jpg").write_bytes(good0[: len(good0) // 2])
    expected["truncated.jpg"] = "corrupt"
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "corrupt"
    (folder / "notes.jpg").write_text("this is not a picture\n", encoding="utf-8")
    expected["notes.jpg"] = "corrupt"

    gray = np.asarray(make_photo(20).convert("L"), dtype=np.uint16) * 257
    # mode I;16: written as a 16-bit grayscale PNG
    Image.fromarray(gray).save(folder / "deep16.png", compress_level=1)
    expected["deep16.png"] = None
    make_photo(21).convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    expected["cmyk.jpg"] = None
    rgba = make_photo(22).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(folder / "alpha.png", compress_level=1)
    expected["alpha.png"] = None
    palette = make_photo(23).quantize(64, method=Image.Quantize.FASTOCTREE)
    palette.save(folder / "palette.gif")
    expected["palette.gif"] = None
    make_photo(24).save(folder / "photo.webp", quality=90)
    expected["photo.webp"] = None

    exif = Image.Exif()
    exif[0x0112] = 6
    make_photo(25, (400, 300)).save(folder / "rotated.jpg", quality=92, exif=exif.tobytes())
    expected["rotated.jpg"] = None

    make_photo(26, (40, 40)).save(folder / "tiny.png")
    expected["tiny.png"] = "too_small"
    make_photo(27, (1200, 300)).save(folder / "panorama.jpg", quality=92)
    expected["panorama.jpg"] = "extreme_aspect"

    (folder / "good_01_copy.jpg").write_bytes((folder / "good_01.jpg").read_bytes())
    expected["good_01_copy.jpg"] = "duplicate"
    near = make_photo(2).resize((318, 256), Image.Resampling.LANCZOS)
    (folder / "good_02_near.jpg").write_bytes(_jpeg_bytes(near.point(lambda v: min(255, v + 6))))
    expected["good_02_near.jpg"] = "duplicate"
    make_photo(28).filter(ImageFilter.GaussianBlur(6)).save(folder / "blurred.jpg", quality=92)
    expected["blurred.jpg"] = "blurry"

    hostile_name = "$(touch pwned).jpg"
    make_photo(29).save(folder / hostile_name, quality=92)
    expected[hostile_name] = None
    odd_name = "my \"quoted\" 'photo' café ñ.png"
    make_photo(30).save(folder / odd_name, compress_level=1)
    expected[odd_name] = None

    symlink = "linked_outside.jpg"
    (folder / symlink).symlink_to(outside)

    captions = {
        "good_00.txt": f"{TRIGGER} smiling outdoors\n".encode(),
        "good_01.txt": "[trigger] in a red coat, café".encode(),
        "my \"quoted\" 'photo' café ñ.txt": f"{TRIGGER}, portrait".encode(),
        "orphan.txt": f"{TRIGGER} with no picture".encode(),
        "tiny.txt": f"{TRIGGER}, a thumbnail".encode(),
    }
    for name, data in captions.items():
        (folder / name).write_bytes(data)
    return HostileDataset(dir=folder, outside=outside, symlink=symlink, hostile_name=hostile_name,
                          rotated="rotated.jpg", orphan="orphan.txt", expected=expected,
                          captions=captions)


@pytest.fixture
def hostile_dataset(tmp_path: Path) -> HostileDataset:
    return make_hostile_dataset(tmp_path)
