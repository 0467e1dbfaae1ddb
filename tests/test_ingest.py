"""The ingest stage: hostile input is reported, never crashes; originals are never touched."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from remote.dataset.imageops import blur_metric, hamming, phash
from remote.dataset.ingest import ingest, sanitise_stem
from tests.fixtures_data import HostileDataset, make_photo


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` -> sha256 of its bytes (links: their target text)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def by_source(result) -> dict:
    return {record.source: record for record in result.images}


def test_hostile_dataset_is_reported_not_crashed(hostile_dataset: HostileDataset, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree_digest(hostile_dataset.dir)
    outside_before = hostile_dataset.outside.read_bytes()

    result = ingest(hostile_dataset.dir, tmp_path / "work", workers=2)

    assert tree_digest(hostile_dataset.dir) == before
    assert hostile_dataset.outside.read_bytes() == outside_before
    assert not list(tmp_path.rglob("pwned")), "a file name ran as shell text"
    records = by_source(result)
    assert set(records) == set(hostile_dataset.expected)
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        assert records[name].path is None and records[name].issues, name
    assert records["truncated.jpg"].issues[0].startswith("truncated:")
    assert records["empty.jpg"].issues[0].startswith("zero_bytes:")
    assert records["notes.jpg"].issues[0].startswith("not_an_image:")

    skipped = {item["source"]: item["reason"] for item in result.skipped}
    assert skipped[hostile_dataset.symlink].startswith("symlink_outside")
    assert result.orphan_captions == [hostile_dataset.orphan]

    produced = sorted(p.name for p in result.dataset_dir.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in produced), produced
    images = [r.path for r in result.images if r.path is not None]
    assert len({p.name.lower() for p in images}) == len(images)
    for path in images:
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.format in ("JPEG", "PNG"), path


def test_conversions_and_rotation_are_recorded(hostile_dataset: HostileDataset,
                                               tmp_path: Path) -> None:
    records = by_source(ingest(hostile_dataset.dir, tmp_path / "work", workers=1))
    rotated = records[hostile_dataset.rotated]
    assert (rotated.width, rotated.height) == (300, 400)
    assert rotated.source_size == (400, 300)
    assert "exif rotated (orientation 6)" in rotated.decisions
    with Image.open(rotated.path) as im:
        assert im.size == (300, 400)
        assert im.getexif().get(0x0112) in (None, 1)
    assert any("CMYK" in d for d in records["cmyk.jpg"].decisions)
    assert any("16-bit" in d for d in records["deep16.png"].decisions)
    assert records["deep16.png"].path.suffix == ".png"
    assert any("alpha composited on white" in d for d in records["alpha.png"].decisions)
    assert records["palette.gif"].path.suffix == ".png"
    assert records["photo.webp"].path.suffix == ".jpg"
    assert records["good_00.jpg"].decisions == ["copied unchanged"]
    original = (hostile_dataset.dir / "good_00.jpg").read_bytes()
    assert records["good_00.jpg"].path.read_bytes() == original


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gray8 = np.asarray(make_photo(5).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(src / "deep.png")
    record = ingest(src, tmp_path / "work", workers=1).images[0]
    with Image.open(record.path) as im:
        out = np.asarray(im.convert("L"), dtype=np.int16)
    assert np.abs(out - gray8).max() <= 1


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(src / "clear.png")
    record = ingest(src, tmp_path / "work", workers=1).images[0]
    with Image.open(record.path) as im:
        assert im.getpixel((10, 10)) == (255, 255, 255)


def test_downscales_with_draft_and_never_upscales(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_photo(1, (1500, 500)).save(src / "wide.jpg", quality=90)
    make_photo(2, (800, 600)).save(src / "big.png", compress_level=1)
    make_photo(3, (500, 400)).save(src / "small.jpg", quality=90)
    records = by_source(ingest(src, tmp_path / "work", max_side=600, workers=1))
    assert (records["wide.jpg"].width, records["wide.jpg"].height) == (600, 200)
    assert "resized from 1500x500 to 600x200" in records["wide.jpg"].decisions
    assert (records["big.png"].width, records["big.png"].height) == (600, 450)
    assert records["big.png"].path.suffix == ".png"
    assert (records["small.jpg"].width, records["small.jpg"].height) == (500, 400)
    with Image.open(records["wide.jpg"].path) as im:
        assert im.size == (600, 200)


def test_pool_and_inline_agree(small_dataset: Path, tmp_path: Path) -> None:
    inline = ingest(small_dataset, tmp_path / "a", workers=1)
    pooled = ingest(small_dataset, tmp_path / "b", workers=2)
    assert [(r.source, r.phash, r.blur) for r in inline.images] == \
           [(r.source, r.phash, r.blur) for r in pooled.images]


def test_captions_are_paired_byte_for_byte(hostile_dataset: HostileDataset, tmp_path: Path) -> None:
    records = by_source(ingest(hostile_dataset.dir, tmp_path / "work", workers=1))
    odd = "my \"quoted\" 'photo' café ñ.png"
    for image, caption in (("good_00.jpg", "good_00.txt"),
                           (odd, "my \"quoted\" 'photo' café ñ.txt")):
        record = records[image]
        assert record.caption_source == caption
        assert record.caption_path.stem == record.path.stem
        assert record.caption_path.read_bytes() == hostile_dataset.captions[caption]
    assert records["good_02.jpg"].caption_path is None


def test_manifest_records_every_file(hostile_dataset: HostileDataset, tmp_path: Path) -> None:
    result = ingest(hostile_dataset.dir, tmp_path / "work", workers=1)
    assert result.manifest_path == tmp_path / "work" / "manifest.json"
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    entries = {entry["source"]: entry for entry in manifest["images"]}
    assert set(entries) == set(hostile_dataset.expected)
    assert entries["rotated.jpg"]["decisions"] == ["exif rotated (orientation 6)"]
    assert entries["empty.jpg"]["output"] is None and entries["empty.jpg"]["issues"]
    assert manifest["orphan_captions"] == ["orphan.txt"]
    assert manifest["skipped"][0]["source"] == hostile_dataset.symlink


def test_rerun_starts_afresh_and_refuses_overlap(small_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    ingest(small_dataset, work, workers=1)
    (work / "dataset" / "stale.jpg").write_bytes(b"x")
    ingest(small_dataset, work, workers=1)
    assert not (work / "dataset" / "stale.jpg").exists()
    with pytest.raises(ValueError):
        ingest(small_dataset, small_dataset / "work", workers=1)
    with pytest.raises(FileNotFoundError):
        ingest(tmp_path / "nope", work, workers=1)


def test_symlink_inside_the_folder_is_read(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    make_photo(7).save(src / "sub" / "a.jpg", quality=90)
    (src / "alias.jpg").symlink_to(src / "sub" / "a.jpg")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours", encoding="utf-8")
    (src / "alias.txt").symlink_to(secret)
    result = ingest(src, tmp_path / "work", workers=1)
    records = by_source(result)
    assert records["alias.jpg"].path is not None
    assert records["alias.jpg"].caption_path is None
    assert [item["source"] for item in result.skipped] == ["alias.txt"]
    assert result.skipped[0]["reason"].startswith("symlink_outside")
    assert records["sub/a.jpg"].path.name == "sub__a.jpg"


@pytest.mark.parametrize("rel, stem", [
    ("$(touch pwned).jpg", "touch_pwned"),
    ("my \"quoted\" 'photo' café ñ.png", "my_quoted_photo_cafe_n"),
    ("../../etc/passwd.jpg", "etc__passwd"),
    ("-rf .jpg", "rf"),
    ("日本.jpg", "image"),
])
def test_sanitise_stem(rel: str, stem: str) -> None:
    assert sanitise_stem(rel) == stem


def test_phash_and_blur_behave() -> None:
    a, b = make_photo(1), make_photo(2)
    assert hamming(phash(a), phash(a.resize((300, 240)))) <= 4
    assert hamming(phash(a), phash(b)) > 10
    blurred = a.filter(ImageFilter.GaussianBlur(5))
    assert blur_metric(a.convert("L")) > 10 * blur_metric(blurred.convert("L"))


def _png_rgb16(width: int, height: int, value: int) -> bytes:
    import struct
    import zlib

    row = b"\x00" + np.full((width, 3), value, dtype=">u2").tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def test_sixteen_bit_rgb_png_is_rewritten_as_8_bit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "rgb16.png").write_bytes(_png_rgb16(300, 260, 40000))
    record = ingest(src, tmp_path / "work", workers=1).images[0]
    assert "converted from 16-bit RGB to 8-bit RGB" in record.decisions
    with Image.open(record.path) as im:
        assert im.mode == "RGB" and im.getpixel((5, 5)) == (156, 156, 156)


@pytest.mark.parametrize("name, data", [
    ("header_only.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("soi_garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
    ("gif_stub.gif", b"GIF89a\x10\x00\x10\x00"),
    ("random.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 64),
])
def test_malformed_files_are_reported(tmp_path: Path, name: str, data: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(data)
    record = ingest(src, tmp_path / "work", workers=1).images[0]
    assert record.path is None and record.issues
    assert not any((tmp_path / "work" / "dataset").iterdir())
