"""report.html and batch_report.html opened in a real (headless) Chromium.

Each page must load with no console error, no broken image and no request outside the file, and
show no Python repr or ``None``; a screenshot of each is saved (into ``$FLUX_REMOTE_SCREENSHOTS``
too when that is set, for CI artifacts). Skipped only where Chromium is absent and cannot be
installed (not root): as root, ``scripts/test.sh`` installs it, so a missing one fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

from remote.plan import make_plan
from remote.publish.bundle import pack_run
from remote.publish.report_html import thumbnail_data_uri
from remote.status import blank_status
from remote.validate import validate_lora, validate_samples
from tests.browser import chromium_binary, inspect_page

PROMPTS = ["[trigger] red circle", "[trigger] yellow square"]
REPR = re.compile(r"\bNone\b|\{'|'\}|\[\]|\bTrue\b|\bFalse\b|nan\b")


def _spec(name: str = "demo-local", **training: object) -> dict:
    return {"name": name, "trigger_word": "d3m0", "base_model": "flux-dev",
            "dataset": {"path": "/data", "caption_ext": "txt"},
            "training": {"trainer": "tiny", "steps": 20, "rank": 4, "lr": 1e-3, "save_every": 10,
                         "sample": {"prompts": PROMPTS}, **training},
            "budget": {"max_usd": 1.0}}


def _picture(path: Path, colour: str, size: tuple[int, int] = (64, 64)) -> Path:
    image = Image.new("RGB", size, "navy")
    ImageDraw.Draw(image).ellipse((12, 12, size[0] - 12, size[1] - 12), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_report(root: Path, name: str = "demo-local", **training: object) -> Path:
    """A bundle packed by the real ``pack_run``, with real validation, a gate exclusion and
    samples at three checkpoints; returns its ``report.html``."""
    run_dir = root / "run"
    out = run_dir / "output" / name
    work = run_dir / "work"
    (work / "dataset").mkdir(parents=True)
    lora = out / f"{name}.safetensors"
    out.mkdir(parents=True)
    save_file({"transformer.a.lora_A.weight": np.ones((4, 8), np.float32),
               "transformer.a.lora_B.weight": np.ones((8, 4), np.float32)}, str(lora),
              metadata={"training_info": json.dumps({"step": 20, "epoch": 1})})
    for step, colour in ((0, "grey"), (10, "orange"), (20, "red")):
        for idx in (0, 1):
            _picture(out / "samples" / f"17000{step:02d}__{step:09d}_{idx}.jpg", colour)
    _picture(work / "dataset" / "a.png", "red")
    (work / "dataset" / "a.txt").write_text("d3m0, a red circle")
    blurry = _picture(root / "photos" / "blurry.png", "white", (80, 60))
    gate = {"passed": True, "image_count": 3, "usable_count": 2, "excluded_count": 1,
            "totals": {"blurry": 1, "too_small": 0}, "reasons": [], "warnings": ["only 2 images"]}
    (work / "quality_report.json").write_text(json.dumps(gate))
    (work / "excluded.json").write_text(json.dumps([{
        "source": "blurry.png", "categories": ["blurry"],
        "details": {"blurry": "sharpness 12.5 is under 40"},
        "thumb": thumbnail_data_uri(blurry, size=160)}]))
    (work / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / (1 + s / 5)}) + "\n"
                                             for s in range(1, 21)))
    config = work / "config.yaml"
    config.write_text("job: extension\n")
    plan = make_plan(run_id="r1", spec=_spec(name, **training), run_dir=str(run_dir),
                     dataset_dir="/data", provider="local", price_per_hour=0.0,
                     billing_started_at=1000.0)
    status = blank_status("r1", 5.0)
    status["stages"]["train"].update(started_at=1010.0, ended_at=1070.5)
    validation = {"ok": True, "lora": validate_lora(lora, rank=4),
                  "samples": validate_samples(out / "samples", expected=True)}
    pack_run(plan=plan, status=status, lora=lora, config_path=config, dataset_dir=work / "dataset",
             prompts=PROMPTS, hardware={"name": None, "count": 0, "cpu": "x86_64", "cpu_count": 2,
                                        "ram_gb": 16.0},
             train={"step": 20, "s_per_step": 0.31}, validation=validation, spend_usd=0.0,
             hours=0.02, state="done", ended_at=1100.0)
    return run_dir / "publish" / "report.html"


def make_batch_report(root: Path) -> Path:
    """Two finished runs (their bundles made by :func:`make_report`) and one skipped."""
    from controller.batch.report import render_html

    runs = []
    for i, rank in enumerate((4, 8)):
        bundle = make_report(root / f"run{i}").parent
        runs.append({"name": f"sweep-{i}", "label": None, "run_id": f"r{i}", "result": "done",
                     "state": "done", "attempts": 1, "params": {"training.rank": rank},
                     "bundle": str(bundle), "hours": 0.05 + i / 100, "usd": 0.12 + i,
                     "est_usd": 0.2, "reserved_usd": 2.0, "final_loss": 0.3 - i / 10,
                     "s_per_step": 1.5, "gpu": "RTX 4090", "error": None,
                     "loss_points": [(s, 1.0 / (1 + s * (i + 1))) for s in range(1, 21)]})
    runs.append({"name": "sweep-2", "label": None, "run_id": None, "result": "skipped: budget",
                 "state": "skipped", "attempts": 0, "params": {"training.rank": 16},
                 "bundle": None, "hours": None, "usd": 0.0, "est_usd": 3.0, "reserved_usd": None,
                 "final_loss": None, "s_per_step": None, "gpu": None, "error": None,
                 "loss_points": []})
    summary = {"batch_id": "b1", "name": "sweep", "state": "done", "budget_usd": 5.0,
               "max_parallel": 2, "spent_usd": 1.24, "varied": ["training.rank"]}
    path = root / "batch_report.html"
    path.write_text(render_html(summary, runs), encoding="utf-8")
    return path


def _visible_text(page: str) -> str:
    body = re.sub(r"<(style|svg)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", body)


def test_the_pages_show_no_reprs_or_none(tmp_path: Path) -> None:
    """Without a browser: what a person reads has no ``None``, dict or bool repr."""
    for page in (make_report(tmp_path / "one"), make_batch_report(tmp_path / "batch")):
        text = _visible_text(page.read_text(encoding="utf-8"))
        assert not REPR.findall(text), REPR.findall(text)


def test_report_headline_and_sections(tmp_path: Path) -> None:
    page = make_report(tmp_path).read_text(encoding="utf-8")
    text = " ".join(_visible_text(page).split())
    for fact in ("state done", "steps 20 / 20", "final loss 0.2000", "cost $0.00 of $1.00",
                 "time 1.5 min", "GPU none (CPU)", "step 0 (base model)", "step 20 (final)",
                 "d3m0 red circle", "blurry.png", "sharpness 12.5 is under 40",
                 "pass LoRA file loads with safetensors", "rank matches the spec 4",
                 "sample images decode 6 images", "time per step 0.31 s", "train 60 s"):
        assert fact in text, fact
    assert page.count("checkpoint at step") == 2  # save_every 10 of 20 steps: 10 and 20


def _browser_or_skip() -> None:
    if chromium_binary():
        return
    if os.geteuid() == 0:
        pytest.fail("chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed and this user cannot install it")


def _check_in_browser(page: Path, tmp_path: Path, min_images: int) -> None:
    report = inspect_page(page)
    shot = tmp_path / f"{page.stem}.png"
    shot.write_bytes(report.screenshot)
    if os.environ.get("FLUX_REMOTE_SCREENSHOTS"):
        folder = Path(os.environ["FLUX_REMOTE_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / shot.name)
    assert report.problems == []
    assert report.image_count >= min_images and report.title
    assert not REPR.findall(report.text), REPR.findall(report.text)
    assert report.screenshot.startswith(b"\x89PNG") and len(report.screenshot) > 10_000


@pytest.mark.slow
def test_report_html_in_a_real_browser(tmp_path: Path) -> None:
    _browser_or_skip()
    _check_in_browser(make_report(tmp_path / "run"), tmp_path, min_images=7)


@pytest.mark.slow
def test_batch_report_html_in_a_real_browser(tmp_path: Path) -> None:
    _browser_or_skip()
    _check_in_browser(make_batch_report(tmp_path / "batch"), tmp_path, min_images=4)


@pytest.mark.slow
def test_the_browser_check_sees_errors_broken_images_and_requests(tmp_path: Path) -> None:
    """The check itself: a page with each fault is caught on each count."""
    _browser_or_skip()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                    '<img src="https://example.invalid/x.png" alt="outside">'
                    '<img src="data:image/png;base64,AAAA" alt="garbled">'
                    '<script>console.error("boom")</script></body></html>')
    report = inspect_page(page)
    assert "boom" in report.console_errors
    assert sorted(report.broken_images) == ["garbled", "outside"]
    assert report.external_requests == ["https://example.invalid/x.png"]
