"""ai-toolkit's checkpoint layout in ``<training_folder>/<name>/``, written atomically.

``<name>_<9-digit step>.safetensors`` (kept: the newest ``max_step_saves_to_keep``),
``<name>.safetensors`` (final) and ``optimizer.pt`` (one file, overwritten at each save). A file
is written to a hidden temp name in the same folder and moved into place with ``os.replace``, so
a reader (or a resume after a kill) never sees half of one.

Files are serialised in memory (the tiny trainer's are small) and written with Python's own file
I/O: a full disk then fails with ``OSError`` ENOSPC naming the file, which the supervisor
recognises as ``disk_full`` (``torch.save`` to a path reports only a C++ iostream error), and a
failed write removes its temp file instead of leaving it to fill the disk further.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)  # safetensors creates 0600; the bundle is meant to be read
    os.replace(tmp, path)


def save_lora_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_bytes_atomic(path, save(tensors, metadata=metadata))


def torch_save_atomic(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` whole or not at all; an ``OSError`` names ``path``."""
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        _fsync_replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def step_path(output_dir: Path, name: str, step: int) -> Path:
    return output_dir / f"{name}_{step:09d}.safetensors"


def final_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}.safetensors"


def step_checkpoints(output_dir: Path, name: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of the step checkpoints, oldest first."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if m := pattern.match(path.name):
                found.append((int(m.group(1)), path))
    return sorted(found)


def read_step(path: Path) -> int | None:
    """The step in a LoRA file's ``training_info`` metadata; None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return int(json.loads(meta["training_info"])["step"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return None


def newest_checkpoint(output_dir: Path, name: str) -> tuple[Path, int] | None:
    """The checkpoint a resume starts from: the highest step in metadata (the final file wins
    a tie), skipping files that cannot be read."""
    candidates = [(step, 0, path) for step, path in step_checkpoints(output_dir, name)]
    final = final_path(output_dir, name)
    if final.is_file():
        candidates.append((-1, 1, final))
    best: tuple[int, int, Path] | None = None
    for _, is_final, path in candidates:
        step = read_step(path)
        if step is not None and (best is None or (step, is_final) > best[:2]):
            best = (step, is_final, path)
    return (best[2], best[0]) if best else None


def prune(output_dir: Path, name: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints; returns what was removed."""
    removed = [path for _, path in step_checkpoints(output_dir, name)[:-keep]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
