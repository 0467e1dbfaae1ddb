"""The tiny trainer: a real LoRA fit with ai-toolkit's output layout, progress lines and resume.

Most runs happen in-process through ``tiny.main`` (torch is imported once); one run goes through
``python -m remote.trainers.tiny`` to prove the module entry point. The helpers here are reused by
``test_train_supervision.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from remote.progress import LogWatcher

BAR_RE = re.compile(r"^\w+: +\d+%\|[# 0-9]{10}\| \d+/\d+ \[\d\d:\d\d<(\d\d:\d\d|\?), "
                    r"( ?\d+\.\d\d(it/s|s/it)|\?it/s)(, lr: \d\.\de[-+]\d\d loss: \d\.\d{3}e[-+]\d\d)?\]$")


def make_dataset(folder: Path, count: int = 12) -> Path:
    """``count`` small images (a coloured disc on a plain background) with caption sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        im = Image.new("RGB", (72, 60), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(5, 35, 2))
        ImageDraw.Draw(im).ellipse([x, y, x + 24, y + 24],
                                   fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(folder / f"img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}")
        (folder / f"img{i:02d}.txt").write_text("a photo of [trigger], a disc", encoding="utf-8")
    return folder


def write_job(root: Path, *, name: str = "demo", steps: int = 100, save_every: int = 25,
              keep: int = 2, sample_every: int | None = 50, rank: int = 4, alpha: float = 4,
              dtype: str = "float16", resolution: int = 32, dataset: Path | None = None,
              lr: float = 1e-4,
              train_extra: dict[str, Any] | None = None) -> Path:
    """An ai-toolkit job YAML (the generator's shape) training on ``root/data``."""
    root.mkdir(parents=True, exist_ok=True)
    dataset = dataset or make_dataset(root / "data")
    process: dict[str, Any] = {
        "type": "sd_trainer", "training_folder": str(root / "output"), "device": "cuda:0",
        "trigger_word": "sks",
        "network": {"type": "lora", "linear": rank, "linear_alpha": alpha},
        "save": {"dtype": dtype, "save_every": save_every, "max_step_saves_to_keep": keep},
        "datasets": [{"folder_path": str(dataset), "caption_ext": "txt", "caption_dropout_rate": 0.05,
                      "resolution": [resolution, 768]}],
        "train": {"batch_size": 1, "steps": steps, "lr": lr, **(train_extra or {})},
        "model": {"name_or_path": "black-forest-labs/FLUX.1-dev", "is_flux": True},
    }
    if sample_every is not None:
        process["sample"] = {"sampler": "flowmatch", "sample_every": sample_every, "seed": 42,
                             "prompts": ["[trigger] on a table", "[trigger] at night"],
                             "sample_steps": 20, "width": 1024, "height": 1024}
    job = {"job": "extension", "config": {"name": name, "process": [process]},
           "meta": {"name": "[name]", "version": "1.0"}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def run_inprocess(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from remote.trainers import tiny

    rc = tiny.main([str(config)])
    return rc, capsys.readouterr().out


def losses(log: str) -> list[float]:
    watcher = LogWatcher()
    events = watcher.feed(log.encode()) + watcher.close()
    return [e.progress.loss for e in events if e.kind == "progress" and e.progress.loss is not None]


def metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def test_full_run_layout_keys_samples_and_loss(tmp_path: Path, capsys) -> None:
    config = write_job(tmp_path, steps=100, save_every=25, keep=2, sample_every=50)
    rc, log = run_inprocess(config, capsys)
    assert rc == 0, log
    out = tmp_path / "output" / "demo"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "demo.safetensors", "demo_000000050.safetensors", "demo_000000075.safetensors"]
    assert (out / "optimizer.pt").is_file() and (out / "config.yaml").read_text() == config.read_text()
    assert not list(out.glob(".*.tmp"))

    from safetensors.torch import load_file

    tensors = load_file(str(out / "demo.safetensors"))
    assert all(re.match(r"^transformer\.[\w.]+\.lora_[AB]\.weight$", k) for k in tensors)
    assert "transformer.blocks.0.conv1.lora_A.weight" in tensors
    assert not [k for k in tensors if k.endswith(".alpha")]
    for key, value in tensors.items():
        assert value.shape[0 if ".lora_A." in key else 1] == 4
        assert str(value.dtype) == "torch.float16"
    meta = metadata(out / "demo.safetensors")
    assert json.loads(meta["training_info"]) == {"step": 100, "epoch": 8}
    assert meta["ss_base_model_version"] == "flux.1" and meta["format"] == "pt"
    assert meta["name"] == "demo" and meta["version"] == "1.0"
    assert meta["lora_rank"] == "4" and meta["lora_alpha"] == "4"
    assert json.loads(meta["software"])["name"] == "flux-remote-tiny"

    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert all(re.match(r"^\d{13}__\d{9}_[01]\.jpg$", s) for s in samples)
    assert sorted({s.split("__")[1] for s in samples}) == [
        "000000000_0.jpg", "000000000_1.jpg", "000000050_0.jpg", "000000050_1.jpg",
        "000000100_0.jpg", "000000100_1.jpg"]
    with Image.open(out / "samples" / samples[-1]) as im:
        assert im.size == (32, 32)

    values = losses(log)
    assert len(values) == 100
    fifth = len(values) // 5
    assert np.mean(values[-fifth:]) < np.mean(values[:fifth])


DEMO_DATA = Path(__file__).resolve().parent.parent / "configs" / "demo-data"


@pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="configs/demo-data is not in this checkout")
def test_loss_goes_down_on_the_demo_data(tmp_path: Path, capsys) -> None:
    """configs/demo-local.yaml's settings: 80 steps at 64 px, rank 4, lr 1e-3."""
    config = write_job(tmp_path, steps=80, save_every=20, sample_every=40, resolution=64,
                       dataset=DEMO_DATA, lr=1e-3)
    rc, log = run_inprocess(config, capsys)
    assert rc == 0, log
    values = losses(log)
    fifth = len(values) // 5
    assert len(values) == 80 and np.mean(values[-fifth:]) < 0.9 * np.mean(values[:fifth])


def test_prints_ai_toolkit_lines(tmp_path: Path, capsys) -> None:
    config = write_job(tmp_path, steps=12, save_every=5, sample_every=None)
    rc, log = run_inprocess(config, capsys)
    assert rc == 0
    bars = [seg for seg in re.split(r"[\r\n]", log) if "%|" in seg]
    assert len(bars) == 13  # the 0/12 bar, then one redraw per step
    assert all(BAR_RE.match(bar) for bar in bars), bars
    assert "\rdemo: 100%|##########| 12/12 [" in log
    lines = log.replace("\r", "\n").splitlines()
    assert "Saving at step 5" in lines and "Saving at step 10" in lines
    assert f"Saved checkpoint to {tmp_path}/output/demo/demo_000000005.safetensors" in lines
    assert f"Saved checkpoint to {tmp_path}/output/demo/demo.safetensors" in lines
    assert not (tmp_path / "output" / "demo" / "samples").exists()  # no sample section


def test_rerun_is_a_no_op_and_more_steps_extend(tmp_path: Path, capsys) -> None:
    config = write_job(tmp_path, steps=20, save_every=10, sample_every=None)
    assert run_inprocess(config, capsys)[0] == 0
    final = tmp_path / "output" / "demo" / "demo.safetensors"
    before = final.stat().st_mtime_ns
    rc, log = run_inprocess(config, capsys)
    assert rc == 0 and "nothing to do" in log and "%|" not in log
    assert final.stat().st_mtime_ns == before

    config = write_job(tmp_path, steps=30, save_every=10, sample_every=None,
                       dataset=tmp_path / "data")
    rc, log = run_inprocess(config, capsys)
    assert rc == 0
    assert "Found step 20 in metadata" in log
    steps = [int(m) for m in re.findall(r"\| (\d+)/30 \[", log)]
    assert steps[0] == 20 and steps[1] == 21 and steps[-1] == 30
    assert json.loads(metadata(final)["training_info"])["step"] == 30


def test_crash_once_then_exact_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    """A run that crashes and resumes ends with the same weights as one that never stopped."""
    from safetensors.torch import load_file

    straight = write_job(tmp_path / "a", steps=24, save_every=8, sample_every=None, dtype="float32")
    assert run_inprocess(straight, capsys)[0] == 0

    crashy = write_job(tmp_path / "b", steps=24, save_every=8, sample_every=None, dtype="float32",
                       dataset=tmp_path / "a" / "data")
    monkeypatch.setenv("FLUX_REMOTE_TINY_CRASH_AT_STEP", "13")
    rc, log = run_inprocess(crashy, capsys)
    assert rc == 1
    assert "Error running job: CUDA out of memory" in log and "Traceback" in log
    out = tmp_path / "b" / "output" / "demo"
    assert (out / ".tiny_crashed_at_13").exists() and not (out / "demo.safetensors").exists()

    rc, log = run_inprocess(crashy, capsys)  # the marker makes the crash happen once
    assert rc == 0 and "Found step 8 in metadata" in log
    a = load_file(str(tmp_path / "a" / "output" / "demo" / "demo.safetensors"))
    b = load_file(str(out / "demo.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert np.allclose(a[key].numpy(), b[key].numpy(), atol=1e-6), key


def test_sigterm_during_a_save_finishes_it_then_stops(tmp_path: Path, capsys, monkeypatch) -> None:
    from remote.trainers import checkpoints

    real_save = checkpoints.torch_save_atomic
    calls = []

    def save_and_get_terminated(path: Path, obj: Any) -> None:
        calls.append(obj["step"])
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the save
        real_save(path, obj)

    monkeypatch.setattr(checkpoints, "torch_save_atomic", save_and_get_terminated)
    config = write_job(tmp_path, steps=40, save_every=5, sample_every=None)
    rc, log = run_inprocess(config, capsys)
    assert rc == 143
    out = tmp_path / "output" / "demo"
    assert calls == [5]  # the stop came during the step-5 save: no second save at the same step
    assert [p.name for p in out.glob("*.safetensors")] == ["demo_000000005.safetensors"]
    assert json.loads(metadata(out / "demo_000000005.safetensors")["training_info"])["step"] == 5
    assert "Saved checkpoint to " + str(out / "demo_000000005.safetensors") in log
    assert log.rstrip().endswith("Saved optimizer to " + str(out / "optimizer.pt"))  # whole save
    assert not list(out.glob(".*.tmp"))


def test_module_entry_point_and_bad_config(tmp_path: Path) -> None:
    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0"}
    config = write_job(tmp_path, steps=5, save_every=100, sample_every=2, train_extra={
        "disable_sampling": True})
    done = subprocess.run([sys.executable, "-m", "remote.trainers.tiny", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5/5 [" in done.stdout
    assert (tmp_path / "output" / "demo" / "demo.safetensors").is_file()
    assert not (tmp_path / "output" / "demo" / "samples").exists()  # train.disable_sampling

    bad = tmp_path / "bad.yaml"
    bad.write_text("config: {name: x}\n")
    from remote.trainers import tiny

    assert tiny.main([str(bad)]) == 2
