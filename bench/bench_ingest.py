"""Ingest throughput: the agent's ingest + quality gate against a naive Pillow loop, same run.

Generates ``--n`` (200) synthetic 2048x1536 JPEG photos in a temp dir, a third of them
EXIF-rotated, then times

    naive   for each file: open, ``ImageOps.exif_transpose``, resize to ``--max-side`` (LANCZOS),
            save PNG (Pillow's default compression), a 64-bit pHash (``imagehash`` when installed,
            else the same numpy DCT hash the agent uses); one process
    agent   ``remote.dataset.ingest.ingest`` (draft decode at the target scale, one decode for
            output, hash and blur, JPEG/fast-PNG output, a process pool of ``--workers``) +
            ``remote.dataset.quality.run_gate``

and prints images/s for both and their ratio (target: agent >= 2x naive on 2 cores). A second
baseline row, the same naive loop writing JPEG q95 like the agent does, shows how much of the
gain is the output format and how much is draft decoding and the pool. The target
size defaults to 1024 px (ai-toolkit's largest default training resolution), so both sides
really resize. Results go to bench/results/ingest.json.

    python bench/bench_ingest.py [--n 200] [--max-side 1024] [--workers N]
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

from remote.dataset.imageops import phash  # noqa: E402
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


def run_naive(src: Path, out: Path, max_side: int, fmt: str = "PNG") -> float:
    _, hash_fn = naive_hash()
    out.mkdir()
    ext, options = (".png", {}) if fmt == "PNG" else (".jpg", {"quality": 95})
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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        generate(src, args.n)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.n} {SIZE[0]}x{SIZE[1]} JPEGs in {gen_s:.1f}s", file=sys.stderr)
        naive_s = run_naive(src, Path(tmp) / "naive", args.max_side)
        naive_jpeg_s = run_naive(src, Path(tmp) / "naive_jpeg", args.max_side, "JPEG")
        ingest_s, agent_s = run_agent(src, Path(tmp) / "work", args.max_side, args.workers)

    naive_ips, agent_ips = args.n / naive_s, args.n / agent_s
    ratio = agent_ips / naive_ips
    workers = args.workers or usable_cpus()
    print(f"{'method':<34} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    print(f"{'naive Pillow loop (1 process)':<34} {naive_s:>8.2f} {naive_ips:>9.1f} {1.0:>6.2f}")
    print(f"{'naive loop, JPEG q95 output':<34} {naive_jpeg_s:>8.2f} "
          f"{args.n / naive_jpeg_s:>9.1f} {naive_s / naive_jpeg_s:>6.2f}")
    print(f"{f'ingest + gate ({workers} workers)':<34} {agent_s:>8.2f} {agent_ips:>9.1f} "
          f"{ratio:>6.2f}")
    print(f"  ingest alone {ingest_s:.2f}s; {naive_jpeg_s / agent_s:.2f}x the JPEG-output loop")
    print(f"  target: ratio >= 2.0 on 2 cores: "
          f"{'met' if ratio >= 2.0 else 'NOT met'}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "pillow": Image.__version__},
        "n": args.n, "size": list(SIZE), "max_side": args.max_side, "workers": workers,
        "naive_hash": naive_hash()[0],
        "naive_s": round(naive_s, 3), "naive_images_per_s": round(naive_ips, 2),
        "naive_jpeg_s": round(naive_jpeg_s, 3),
        "naive_jpeg_images_per_s": round(args.n / naive_jpeg_s, 2),
        "ratio_vs_naive_jpeg": round(naive_jpeg_s / agent_s, 2),
        "agent_s": round(agent_s, 3), "agent_ingest_s": round(ingest_s, 3),
        "agent_images_per_s": round(agent_ips, 2), "ratio": round(ratio, 2),
        "target_ratio": 2.0, "met": ratio >= 2.0,
    }
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
