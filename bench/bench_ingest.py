"""Ingest throughput: the agent's ingest + quality gate against a naive Pillow loop, same run.

Generates ``--n`` (200) synthetic 2048x1536 JPEG photos in a temp dir, a third of them
EXIF-rotated, then times

    naive   for each file: open, ``ImageOps.exif_transpose``, resize to ``--max-side`` (LANCZOS),
            save in **the agent's output format** (JPEG sources -> JPEG at
            ``remote.dataset.imageops.JPEG_QUALITY``, as ``imageops`` writes them), a 64-bit pHash
            (``imagehash`` when installed, else the same numpy DCT hash the agent uses); one
            process
    agent   ``remote.dataset.ingest.ingest`` (draft decode at the target scale, one decode for
            output, hash and blur, a process pool of ``--workers``) +
            ``remote.dataset.quality.run_gate``

and prints images/s for both and their ratio (target: agent >= 2x the naive loop on 2 cores).
Same output format on both sides, so the ratio is what draft decoding, the single decode and the
pool buy, not a cheaper file format. ``--with-png`` also times the naive loop writing PNG
(Pillow's default compression), the older, slower baseline, for comparison only. The target
size defaults to 1024 px (ai-toolkit's largest default training resolution), so both sides
really resize. Results go to bench/results/ingest.json.

What makes the ratio come out badly: a loaded machine (the pool competes for the same cores),
one usable CPU (no pool), or sources already at the target size (no draft decoding gain).

    python bench/bench_ingest.py [--n 200] [--max-side 1024] [--workers N] [--with-png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from remote.dataset.imageops import JPEG_QUALITY, phash  # noqa: E402
from remote.dataset.ingest import ingest, usable_cpus  # noqa: E402
from remote.dataset.quality import run_gate  # noqa: E402

SIZE = (2048, 1536)


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` sharp synthetic photos; every third one stored sideways with EXIF orientation 6/8."""
    rng = np.random.default_rng(seed)
    # One noise field (cheap), shifted per image so no two files share their texture.
    noise = rng.normal(0, 10, (SIZE[1], SIZE[0], 1)).astype(np.int16)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse, "RGB").resize(SIZE, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, SIZE[0] - 64)), int(rng.integers(0, SIZE[1] - 64))
            box = (x0, y0, x0 + int(rng.integers(32, 900)), y0 + int(rng.integers(32, 700)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        arr = np.asarray(im, dtype=np.int16) + np.roll(noise, i * 37, axis=1)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        kwargs = {}
        if i % 3 == 0:
            exif = Image.Exif()
            exif[0x0112] = 6 if i % 2 == 0 else 8
            kwargs["exif"] = exif.tobytes()
        im.save(folder / f"photo_{i:04d}.jpg", quality=90, **kwargs)


def naive_hash():
    try:
        import imagehash
    except ImportError:
        return "numpy DCT pHash", phash
    return "imagehash.phash", lambda im: int(str(imagehash.phash(im)), 16)


def run_naive(src: Path, out: Path, max_side: int, fmt: str = "JPEG") -> float:
    """The plain loop; ``fmt`` JPEG writes what the agent writes for JPEG sources."""
    _, hash_fn = naive_hash()
    out.mkdir()
    ext, options = (".png", {}) if fmt == "PNG" else (".jpg", {"quality": JPEG_QUALITY})
    started = time.perf_counter()
    for path in sorted(src.glob("*.jpg")):
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            scale = max_side / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)),
                               Image.Resampling.LANCZOS)
            im.save(out / f"{path.stem}{ext}", fmt, **options)
            hash_fn(im)
    return time.perf_counter() - started


def run_agent(src: Path, work: Path, max_side: int, workers: int | None) -> tuple[float, float]:
    started = time.perf_counter()
    result = ingest(src, work, max_side=max_side, workers=workers)
    ingested = time.perf_counter()
    report = run_gate(result, {"min_images": 1}, caption_ext="txt")
    gated = time.perf_counter()
    bad = [r.source for r in result.images if r.path is None]
    if bad or len(report.usable) + len(report.excluded) != len(result.images):
        raise SystemExit(f"agent ingest lost images: {bad}")
    return ingested - started, gated - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images to generate (default 200)")
    parser.add_argument("--max-side", type=int, default=1024, help="target long side (1024)")
    parser.add_argument("--workers", type=int, default=None, help="agent pool size (all CPUs)")
    parser.add_argument("--with-png", action="store_true",
                        help="also time the naive loop writing PNG (comparison only)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        generate(src, args.n)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.n} {SIZE[0]}x{SIZE[1]} JPEGs in {gen_s:.1f}s", file=sys.stderr)
        naive_s = run_naive(src, Path(tmp) / "naive", args.max_side)
        png_s = run_naive(src, Path(tmp) / "naive_png", args.max_side, "PNG") \
            if args.with_png else None
        ingest_s, agent_s = run_agent(src, Path(tmp) / "work", args.max_side, args.workers)

    naive_ips, agent_ips = args.n / naive_s, args.n / agent_s
    ratio = agent_ips / naive_ips
    workers = args.workers or usable_cpus()
    print(f"{'method':<40} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    print(f"{f'naive loop, JPEG q{JPEG_QUALITY} (1 process)':<40} {naive_s:>8.2f} "
          f"{naive_ips:>9.1f} {1.0:>6.2f}")
    if png_s is not None:
        print(f"{'naive loop, PNG output (comparison only)':<40} {png_s:>8.2f} "
              f"{args.n / png_s:>9.1f} {naive_s / png_s:>6.2f}")
    print(f"{f'ingest + gate ({workers} workers)':<40} {agent_s:>8.2f} {agent_ips:>9.1f} "
          f"{ratio:>6.2f}")
    print(f"  ingest alone {ingest_s:.2f}s; target: ratio >= 2.0 on 2 cores: "
          f"{'met' if ratio >= 2.0 else 'NOT met'}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "pillow": Image.__version__},
        "n": args.n, "size": list(SIZE), "max_side": args.max_side, "workers": workers,
        "naive_hash": naive_hash()[0],
        "naive_s": round(naive_s, 3), "naive_images_per_s": round(naive_ips, 2),
        "naive_format": f"JPEG q{JPEG_QUALITY} (the agent's output for JPEG sources)",
        "naive_png_s": round(png_s, 3) if png_s is not None else None,
        "ratio_vs_naive_png": round(png_s / agent_s, 2) if png_s is not None else None,
        "agent_s": round(agent_s, 3), "agent_ingest_s": round(ingest_s, 3),
        "agent_images_per_s": round(agent_ips, 2), "ratio": round(ratio, 2),
        "target_ratio": 2.0, "met": ratio >= 2.0,
    }
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
