"""LoRA and sample validation on hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from remote.validate import parse_sample_name, validate_lora, validate_samples

META = {"training_info": json.dumps({"step": 250, "epoch": 1}), "format": "pt"}


def lora(path: Path, rank: int = 4, meta=META, **extra) -> Path:
    tensors = {
        "transformer.blocks.0.attn.to_q.lora_A.weight": np.ones((rank, 32), np.float16),
        "transformer.blocks.0.attn.to_q.lora_B.weight": np.zeros((32, rank), np.float16),
        "transformer.blocks.0.conv.lora_A.weight": np.ones((rank, 8, 3, 3), np.float32),
        "transformer.blocks.0.conv.lora_B.weight": np.ones((16, rank, 1, 1), np.float32),
        **extra,
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def test_a_good_lora_passes(tmp_path: Path) -> None:
    report = validate_lora(lora(tmp_path / "a.safetensors"), rank=4)
    assert report["ok"], report["problems"]
    assert report["step"] == 250 and report["pairs"] == 2 and report["tensors"] == 4


def test_wrong_rank_nan_naming_and_metadata(tmp_path: Path) -> None:
    bad = np.ones((4, 32), np.float32)
    bad[0, 0] = np.nan
    path = lora(tmp_path / "b.safetensors", meta={"format": "pt"},
                **{"x.lora_A.weight": bad, "x.lora_B.weight": np.ones((32, 4), np.float32),
                   "y.lora_down.weight": np.ones((4, 4), np.float32),
                   "z.lora_A.weight": np.ones((4, 4), np.float32)})
    report = validate_lora(path, rank=8)
    problems = "\n".join(report["problems"])
    assert not report["ok"]
    assert "x.lora_A.weight holds NaN" in problems
    assert "unexpected key y.lora_down.weight" in problems
    assert "z has lora_A without its partner" in problems
    assert "rank 4, the spec says 8" in problems
    assert "does not name the step" in problems


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    assert "does not exist" in validate_lora(tmp_path / "none.safetensors", rank=4)["problems"][0]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert "does not load" in validate_lora(junk, rank=4)["problems"][0]


def test_bf16_files_are_read_through_torch(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    path = tmp_path / "bf16.safetensors"
    save_torch({"a.lora_A.weight": torch.ones(2, 8, dtype=torch.bfloat16),
                "a.lora_B.weight": torch.full((8, 2), float("inf"), dtype=torch.bfloat16)},
               str(path), metadata=META)
    report = validate_lora(path, rank=2)
    assert report["problems"] == ["a.lora_B.weight holds NaN or Inf"]


def test_samples_decode(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (8, 8)).save(samples / "1700000000000__000000250_0.jpg")
    assert validate_samples(samples, expected=True)["ok"]
    (samples / "1700000000001__000000250_1.jpg").write_bytes(b"not a jpeg")
    report = validate_samples(samples, expected=True)
    assert report["count"] == 2 and "does not decode" in report["problems"][0]
    assert validate_samples(tmp_path / "none", expected=True)["problems"]
    assert validate_samples(tmp_path / "none", expected=False)["ok"]
    assert parse_sample_name("1700000000000__000000250_3.jpg") == (250, 3)
    assert parse_sample_name("other.jpg") is None
