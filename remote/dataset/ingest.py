"""The ingest stage: the user's folder -> a clean training folder plus ``manifest.json``.

The originals are only ever opened for reading. Every file in the folder is classified (image,
caption sidecar, something else); images are decoded once each in a process pool
(:func:`remote.dataset.imageops.process_image`) and written to ``work_dir/dataset`` under a
sanitised, unique name; each caption sidecar is copied byte for byte next to its image's new
name. Symlinks that lead outside the folder are reported and never opened. File names are data:
nothing here goes through a shell.

A worker that dies (the OOM killer, a decoder that segfaults on a hostile file) breaks the whole
pool: every file it had not finished is ingested again, one at a time, each in a worker of its
own (:func:`_retry_alone`), and only a file whose lone worker dies too is reported as corrupt.

Test hook: ``FLUX_REMOTE_INGEST_FAULT=exit:<file name>`` makes a pool worker that picks up a file
of that name exit at once (``os._exit(1)``), as a killed worker would. The agent's own process
never reads it (``workers=1`` decodes inline without the hook).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import unicodedata
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote.dataset.imageops import ImageTask, _remove_partial_output, process_image
from remote.plan import write_json_atomic

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_STEM = 80
FAULT_ENV = "FLUX_REMOTE_INGEST_FAULT"


@dataclass
class ImageRecord:
    """One image file of the dataset and what ingest made of it."""

    source: str  # path relative to the dataset folder (posix separators)
    path: Path | None  # the ingested file, or None when the source is not a usable image
    caption_path: Path | None  # the caption next to ``path`` (None: no caption yet)
    width: int | None  # size of the ingested image (after EXIF transpose and resize)
    height: int | None
    phash: int | None  # 64-bit DCT perceptual hash
    blur: float | None  # variance of Laplacian at 256 px long side
    issues: list[str] = field(default_factory=list)  # "code: detail", e.g. "truncated: ..."
    decisions: list[str] = field(default_factory=list)  # what ingest changed, in order
    format: str | None = None  # the source's format as Pillow names it
    source_size: tuple[int, int] | None = None  # as stored, before EXIF transpose
    caption_source: str | None = None  # the original sidecar, relative to the dataset folder

    @property
    def usable(self) -> bool:
        return self.path is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.path.name if self.path else None,
            "format": self.format,
            "source_size": list(self.source_size) if self.source_size else None,
            "size": [self.width, self.height] if self.width is not None else None,
            "caption_source": self.caption_source,
            "caption": self.caption_path.name if self.caption_path else None,
            "phash": f"{self.phash:016x}" if self.phash is not None else None,
            "blur": round(self.blur, 2) if self.blur is not None else None,
            "decisions": list(self.decisions),
            "issues": list(self.issues),
        }


@dataclass
class IngestResult:
    images: list[ImageRecord]
    manifest_path: Path
    dataset_dir: Path  # the folder the trainer reads: converted images + caption sidecars
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}
    orphan_captions: list[str] = field(default_factory=list)  # captions without an image
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "images": [record.to_dict() for record in self.images],
            "skipped": list(self.skipped),
            "orphan_captions": list(self.orphan_captions),
            "totals": {
                "files": len(self.images),
                "ingested": sum(1 for r in self.images if r.usable),
                "unusable": sum(1 for r in self.images if not r.usable),
                "skipped": len(self.skipped),
                "orphan_captions": len(self.orphan_captions),
            },
            "elapsed_s": round(self.elapsed_s, 3),
        }


def ingest(src_dir: Path, work_dir: Path, *, caption_ext: str = "txt", max_side: int = 2048,
           workers: int | None = None) -> IngestResult:
    """Ingest ``src_dir`` into ``work_dir/dataset`` and write ``work_dir/manifest.json``.

    ``workers=None`` uses every CPU this process may run on; ``workers=1`` decodes inline (no
    pool). Re-running starts the dataset folder afresh. Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a
    missing folder and ``ValueError`` when the work dir would overlap the originals.
    """
    started = time.monotonic()
    src_dir = Path(src_dir)
    if not src_dir.exists():
        raise FileNotFoundError(f"{src_dir}: no such dataset folder")
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir}: not a folder")
    src_root = src_dir.resolve()
    work_dir = Path(work_dir).resolve()
    if _overlaps(src_root, work_dir):
        raise ValueError(f"work dir {work_dir} overlaps the dataset {src_root}: "
                         "ingest never writes into the originals")
    dataset_dir = work_dir / "dataset"
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    dataset_dir.mkdir(parents=True)

    scan = _scan(src_root, caption_ext)
    stems = _unique_stems(scan.images)
    tasks = [ImageTask(str(src_root / rel), str(dataset_dir), stem, max_side)
             for rel, stem in zip(scan.images, stems)]
    outcomes = _run(tasks, workers)

    records = []
    for rel, outcome in zip(scan.images, outcomes):
        records.append(_record(rel, outcome, scan.captions, src_root, dataset_dir, caption_ext))
    result = IngestResult(
        images=records, manifest_path=work_dir / "manifest.json", dataset_dir=dataset_dir,
        skipped=scan.skipped, orphan_captions=_orphans(scan),
        elapsed_s=time.monotonic() - started,
    )
    write_json_atomic(result.manifest_path, {"source_dir": str(src_root), **result.to_dict()})
    return result


@dataclass
class _Scan:
    images: list[str] = field(default_factory=list)  # relative posix paths, sorted
    captions: dict[str, str] = field(default_factory=dict)  # "dir/stem" -> relative caption path
    skipped: list[dict[str, str]] = field(default_factory=list)


def _scan(root: Path, caption_ext: str) -> _Scan:
    """Classify every entry below ``root`` without following links that leave it."""
    scan = _Scan()
    cap_suffix = "." + caption_ext.lower()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if name.startswith("."):
                scan.skipped.append({"source": rel, "reason": "hidden folder"})
            elif full.is_symlink():
                scan.skipped.append({"source": rel, "reason": _link_reason(full, root, "folder")})
            else:
                kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if name.startswith("."):
                scan.skipped.append({"source": rel, "reason": "hidden file"})
                continue
            if full.is_symlink() and not _inside(full, root):
                scan.skipped.append({"source": rel, "reason": _link_reason(full, root, "file")})
                continue
            if not full.is_file():
                scan.skipped.append({"source": rel, "reason": "not a regular file"})
                continue
            suffix = full.suffix.lower()
            if suffix in IMAGE_EXTS:
                scan.images.append(rel)
            elif suffix == cap_suffix:
                scan.captions[_key(rel)] = rel
            else:
                what = suffix or "no extension"
                scan.skipped.append({"source": rel, "reason": f"not an image ({what})"})
    scan.images.sort()
    return scan


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _link_reason(path: Path, root: Path, what: str) -> str:
    if what == "file":
        return "symlink_outside: points outside the dataset folder; not followed"
    if _inside(path, root):
        return "symlinked folder: not followed (links inside the dataset would read files twice)"
    return "symlink_outside: folder link points outside the dataset folder; not followed"


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _key(rel: str) -> str:
    """Pairs an image with its sidecar: same folder, same stem (``a/b.jpg`` <-> ``a/b.txt``)."""
    path = Path(rel)
    return (path.parent / path.stem).as_posix()


def sanitise_stem(rel: str) -> str:
    """A file stem that is safe anywhere: ASCII letters, digits, ``._-``; the folder is kept as
    a prefix so ``a/x.jpg`` and ``b/x.jpg`` stay apart."""
    path = Path(rel)
    parts = [*path.parent.parts, path.stem] if path.parent != Path(".") else [path.stem]
    text = "__".join(parts)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    text = re.sub(r"_{3,}", "__", text).strip("._-")
    return text[:MAX_STEM].rstrip("._-") or "image"


def _unique_stems(images: list[str]) -> list[str]:
    taken: set[str] = set()
    stems = []
    for rel in images:
        base = sanitise_stem(rel)
        stem, n = base, 2
        while stem.lower() in taken:
            stem, n = f"{base}_{n}", n + 1
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def _run(tasks: list[ImageTask], workers: int | None) -> list[dict[str, Any]]:
    """One outcome per task, in order: decoded in a pool, inline when one worker is enough."""
    workers = workers or usable_cpus()
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        return [process_image(task) for task in tasks]
    futures: list[Future] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            for task in tasks:
                futures.append(pool.submit(_decode, task))
        except BrokenProcessPool:
            pass  # a worker died before every file was queued: the rest are retried below
        outcomes = [_collect(future) for future in futures]
    outcomes += [None] * (len(tasks) - len(outcomes))
    lost = [i for i, outcome in enumerate(outcomes) if outcome is None]
    for i, outcome in zip(lost, _retry_alone([tasks[i] for i in lost])):
        outcomes[i] = outcome
    return outcomes


def usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _decode(task: ImageTask) -> dict[str, Any]:
    """A pool worker's job: :func:`process_image` behind the test hook (see the module doc)."""
    if os.environ.get(FAULT_ENV) == f"exit:{os.path.basename(task.source)}":
        os._exit(1)
    return process_image(task)


def _collect(future: Future) -> dict[str, Any] | None:
    """The worker's outcome, or None when the pool broke before it finished this file."""
    try:
        return future.result()
    except BrokenProcessPool:
        return None


def _retry_alone(tasks: list[ImageTask]) -> list[dict[str, Any]]:
    """The files a dead worker took down with it, again, one at a time in a single worker.

    A worker killed from outside (the OOM killer) costs nothing: its files are ingested now. A
    file whose lone worker dies as well is what kills it; it is reported as corrupt and a fresh
    worker takes the rest. Never decoded in the agent's own process, which such a file would kill.
    """
    outcomes: list[dict[str, Any]] = []
    pool: ProcessPoolExecutor | None = None
    try:
        for task in tasks:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=1)
            try:
                outcome = _collect(pool.submit(_decode, task))
            except BrokenProcessPool:
                outcome = None
            if outcome is None:
                pool.shutdown(wait=True)
                pool = None
                _remove_partial_output(task)
                outcome = _decoder_died()
            outcomes.append(outcome)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return outcomes


def _decoder_died() -> dict[str, Any]:
    return {"output": None, "format": None, "source_size": None, "size": None,
            "decisions": [], "issues": ["corrupt: the decoder process died on this file, "
                                        "twice (once in the pool, once on its own)"],
            "phash": None, "blur": None}


def _record(rel: str, outcome: dict[str, Any], captions: dict[str, str], root: Path,
            dataset_dir: Path, caption_ext: str) -> ImageRecord:
    output = Path(outcome["output"]) if outcome["output"] else None
    size = outcome["size"] or [None, None]
    record = ImageRecord(
        source=rel, path=output, caption_path=None, width=size[0], height=size[1],
        phash=outcome["phash"], blur=outcome["blur"], issues=list(outcome["issues"]),
        decisions=list(outcome["decisions"]), format=outcome["format"],
        source_size=tuple(outcome["source_size"]) if outcome["source_size"] else None,
    )
    caption_rel = captions.get(_key(rel))
    if caption_rel is not None:
        record.caption_source = caption_rel
        if output is not None:
            record.caption_path = dataset_dir / f"{output.stem}.{caption_ext}"
            shutil.copyfile(root / caption_rel, record.caption_path)
    return record


def _orphans(scan: _Scan) -> list[str]:
    image_keys = {_key(rel) for rel in scan.images}
    return sorted(rel for key, rel in scan.captions.items() if key not in image_keys)
