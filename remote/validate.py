"""Validate what training produced before it is published.

The LoRA file must load with safetensors, use PEFT-style ``lora_A``/``lora_B`` key naming in
matched pairs whose shapes agree with the rank, hold no NaN/Inf, and name its step in the
``training_info`` metadata. Sample images must exist and decode. The result goes into the receipt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SAMPLE_RE = re.compile(r"^(?P<ms>\d+)__(?P<step>\d{9})_(?P<idx>\d+)\.(jpg|jpeg|png|webp)$", re.I)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _load_tensors(path: Path) -> dict[str, Any]:
    """Name -> numpy array. numpy cannot hold bf16, so those files are read through torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (TypeError, ValueError, SafetensorError):
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def validate_lora(path: Path, *, rank: int | None) -> dict[str, Any]:
    """Check one LoRA file; ``ok`` is False with ``problems`` naming each thing found wrong."""
    import numpy as np
    from safetensors import SafetensorError, safe_open

    report: dict[str, Any] = {"path": str(path), "ok": False, "problems": [], "tensors": 0,
                              "pairs": 0, "step": None, "rank": rank, "bytes": None}
    problems: list[str] = report["problems"]
    if not path.is_file():
        problems.append(f"{path.name} does not exist")
        return report
    report["bytes"] = path.stat().st_size
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = _load_tensors(path)
    except (OSError, ValueError, SafetensorError) as exc:
        problems.append(f"{path.name} does not load with safetensors: {exc}")
        return report
    report["tensors"] = len(tensors)
    if not tensors:
        problems.append("the file holds no tensors")
    bases: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = re.match(r"^(?P<base>.+)\.lora_(?P<ab>[AB])\.weight$", key)
        if not match:
            problems.append(f"unexpected key {key} (expected PEFT naming: ...lora_A.weight / "
                            f"...lora_B.weight)")
            continue
        bases.setdefault(match.group("base"), {})[match.group("ab")] = tensor
        if not np.all(np.isfinite(tensor)):
            problems.append(f"{key} holds NaN or Inf")
    for base, pair in sorted(bases.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{base} has lora_{''.join(pair)} without its partner")
            continue
        down, up = pair["A"], pair["B"]
        if down.ndim < 2 or up.ndim < 2:
            problems.append(f"{base}: lora tensors must have at least 2 dimensions")
            continue
        if down.shape[0] != up.shape[1]:
            problems.append(f"{base}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                            f"disagree on the rank")
        elif rank is not None and down.shape[0] != rank:
            problems.append(f"{base}: rank {down.shape[0]}, the spec says {rank}")
    report["pairs"] = len(bases)
    info = metadata.get("training_info")
    try:
        step = json.loads(info)["step"] if info else None
    except (ValueError, KeyError, TypeError):
        step = None
    if isinstance(step, int):
        report["step"] = step
    else:
        problems.append("metadata training_info does not name the step")
    report["ok"] = not problems
    return report


def parse_sample_name(name: str) -> tuple[int, int] | None:
    """``<epoch_ms>__<9-digit step>_<prompt index>.jpg`` -> (step, prompt index)."""
    match = SAMPLE_RE.match(name)
    return (int(match.group("step")), int(match.group("idx"))) if match else None


def validate_samples(samples_dir: Path, *, expected: bool) -> dict[str, Any]:
    """Every sample image must decode; none at all is a problem only when sampling was on."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in samples_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if samples_dir.is_dir() else []
    problems = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
        except (OSError, UnidentifiedImageError) as exc:
            problems.append(f"{file.name} does not decode: {exc}")
    if expected and not files:
        problems.append(f"no sample images in {samples_dir}")
    return {"ok": not problems, "count": len(files), "problems": problems,
            "files": [f.name for f in files]}
