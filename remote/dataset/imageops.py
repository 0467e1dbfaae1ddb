"""One image, decoded once: the pixel work of the ingest stage.

:func:`process_image` runs in a worker process. It opens one file, decodes it a single time
(JPEG at the target scale through ``Image.draft``), applies the EXIF orientation, converts it
to 8-bit RGB, downscales it, writes the training copy, and measures the perceptual hash and the
blur metric from the same pixels. It returns a plain dict (cheap to send back from a worker) and
never raises for a bad file: an unusable file comes back with ``output`` set to None and an
issue that names why.

The perceptual hash is the usual 64-bit DCT pHash (32x32 grayscale, 2-D DCT, the 8x8 lowest
frequencies against their median), written with numpy so the same numbers come out on every
machine whether or not ``imagehash`` is installed.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

ANALYSIS_SIDE = 256  # long side of the grayscale copy that hash and blur are measured on
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1  # fast; the training copy is read a few times, not stored for years
LOSSLESS_FORMATS = {"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA"}
COPYABLE_FORMATS = {"JPEG", "PNG"}  # formats ai-toolkit reads well: kept as the user's bytes
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageTask:
    """What a worker needs to ingest one file (picklable)."""

    source: str  # absolute path of the original (opened read-only)
    out_dir: str  # the ingested dataset folder
    out_stem: str  # sanitised, unique file stem; the worker picks the extension
    max_side: int  # long side limit; larger images are downscaled, smaller never upscaled


def process_image(task: ImageTask) -> dict[str, Any]:
    """Ingest one file. Returns ``{"output", "format", "source_size", "size", "decisions",
    "issues", "phash", "blur"}``; ``output`` is None when the file is not a usable image."""
    result: dict[str, Any] = {
        "output": None, "format": None, "source_size": None, "size": None,
        "decisions": [], "issues": [], "phash": None, "blur": None,
    }
    try:
        if os.path.getsize(task.source) == 0:
            result["issues"].append("zero_bytes: the file is empty")
            return result
        _decode_and_write(task, result)
    except Image.DecompressionBombError as exc:
        result["issues"].append(f"too_many_pixels: {exc}")
    except Exception as exc:  # noqa: BLE001 - hostile files make Pillow raise many types
        result["issues"].append(_describe_failure(exc))
    if result["issues"]:
        result["output"] = None
        _remove_partial_output(task)
    return result


def _decode_and_write(task: ImageTask, result: dict[str, Any]) -> None:
    with Image.open(task.source) as im:
        fmt = im.format or "UNKNOWN"
        result["format"] = fmt
        width, height = im.size
        result["source_size"] = [width, height]
        # Before anything that may load pixels (PNG's getexif does): the tile names the depth.
        deep_rgb = im.mode == "RGB" and any(";16" in str(tile.args) for tile in im.tile)
        orientation = _orientation(im)
        frames = getattr(im, "n_frames", 1)
        needs_resize = max(width, height) > task.max_side
        copyable = (
            fmt in COPYABLE_FORMATS and im.mode == "RGB" and "transparency" not in im.info
            and orientation in (0, 1) and not needs_resize and frames == 1 and not deep_rgb
        )
        if fmt in ("JPEG", "MPO"):
            # Decode at the smallest DCT scale that still covers what we need: the analysis
            # size when the file is kept byte for byte, the output size when it is resized.
            side = ANALYSIS_SIDE if copyable else (task.max_side if needs_resize else None)
            if side is not None and max(width, height) > side:
                scale = side / max(width, height)
                im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        im.load()
        if frames > 1:
            result["decisions"].append(f"first frame of {frames}")
        if deep_rgb:
            result["decisions"].append("converted from 16-bit RGB to 8-bit RGB")
        rgb = _to_rgb(im, result["decisions"])
        icc = im.info.get("icc_profile") if im.mode == "RGB" else None

    if orientation not in (0, 1):
        rgb = _apply_orientation(rgb, orientation)
        result["decisions"].append(f"exif rotated (orientation {orientation})")
    if copyable:
        out_w, out_h = width, height
        ext = ".jpg" if fmt == "JPEG" else ".png"
        output = os.path.join(task.out_dir, task.out_stem + ext)
        shutil.copyfile(task.source, output)
        result["decisions"].append("copied unchanged")
    else:
        if needs_resize:
            rgb = resize_long_side(rgb, task.max_side)
            result["decisions"].append(
                f"resized from {width}x{height} to {rgb.width}x{rgb.height}"
                if orientation not in (5, 6, 7, 8)
                else f"resized from {height}x{width} to {rgb.width}x{rgb.height}"
            )
        out_w, out_h = rgb.size
        output = _write(rgb, task, fmt, icc, result["decisions"])
    result["output"] = output
    result["size"] = [out_w, out_h]
    gray = resize_long_side(rgb, ANALYSIS_SIDE).convert("L")
    result["phash"] = phash(gray)
    result["blur"] = blur_metric(gray)


def _write(rgb: Image.Image, task: ImageTask, fmt: str, icc: bytes | None,
           decisions: list[str]) -> str:
    lossless = fmt in LOSSLESS_FORMATS or (fmt == "WEBP" and _webp_is_lossless(task.source))
    extra = {"icc_profile": icc} if icc else {}
    if lossless:
        output = os.path.join(task.out_dir, task.out_stem + ".png")
        rgb.save(output, "PNG", compress_level=PNG_COMPRESS_LEVEL, **extra)
        target = "png"
    else:
        output = os.path.join(task.out_dir, task.out_stem + ".jpg")
        rgb.save(output, "JPEG", quality=JPEG_QUALITY, **extra)
        target = "jpeg"
    if fmt not in COPYABLE_FORMATS:
        decisions.append(f"format {fmt.lower()} -> {target}")
    return output


def _to_rgb(im: Image.Image, decisions: list[str]) -> Image.Image:
    """8-bit RGB from any mode; alpha is composited on white, 16-bit is scaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        decisions.append(f"converted from {mode} (16-bit) to 8-bit RGB" if peak > 255
                         else f"converted from {mode} to RGB")
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        decisions.append(f"converted from {mode}: alpha composited on white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    decisions.append(f"converted from {mode} to RGB")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 0)
    except (OSError, ValueError, SyntaxError):
        return 0
    return int(value) if isinstance(value, int) and 0 <= value <= 8 else 0


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return im.transpose(method)


def _webp_is_lossless(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(40)
    return b"VP8L" in head


def _describe_failure(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated: {text}"
    if "cannot identify image file" in text:
        return "not_an_image: not an image Pillow can read"
    return f"corrupt: {type(exc).__name__}: {text}"


def _remove_partial_output(task: ImageTask) -> None:
    for ext in (".jpg", ".png"):
        try:
            os.remove(os.path.join(task.out_dir, task.out_stem + ext))
        except FileNotFoundError:
            pass


def resize_long_side(im: Image.Image, side: int) -> Image.Image:
    """Downscale so the long side is at most ``side`` (never upscale)."""
    width, height = im.size
    long_side = max(width, height)
    if long_side <= side:
        return im
    scale = side / long_side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


@lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash(gray: Image.Image) -> int:
    """64-bit DCT perceptual hash of a grayscale image (bit 63 = top-left coefficient)."""
    small = np.asarray(gray.convert("L").resize((32, 32), Image.Resampling.LANCZOS),
                       dtype=np.float64)
    dct = _dct_matrix()
    low = (dct @ small @ dct.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def blur_metric(gray: Image.Image) -> float:
    """Variance of the 3x3 Laplacian: low means few edges, i.e. a blurry (or flat) picture."""
    a = np.asarray(gray.convert("L"), dtype=np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
