"""The publish pack: model card, report.html, receipt, bundle and SHA256SUMS."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from safetensors.numpy import save_file

from remote.plan import make_plan
from remote.publish.bundle import (pack_run, read_loss_points, sample_grid, verify_sha256sums,
                                   write_sha256sums)
from remote.publish.model_card import render_model_card
from remote.publish.receipt import stage_durations
from remote.publish.report_html import loss_svg, render_report
from remote.status import blank_status


def spec(base="flux-dev") -> dict:
    return {"name": "my_lora", "trigger_word": "p3r5on", "base_model": base,
            "dataset": {"path": "/data", "caption_ext": "txt"},
            "training": {"trainer": "tiny", "steps": 20, "rank": 4, "lr": 1e-3, "batch_size": 1},
            "budget": {"max_usd": 5.0}}


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


RECEIPT = {"steps": {"done": 20, "planned": 20}, "hardware": {"gpu": "none (CPU)"},
           "spend_usd": 0.0}


def test_model_card_front_matter_dev_and_schnell() -> None:
    widget = [("p3r5on portrait", "samples/1__000000020_0.jpg")]
    dev = front_matter(render_model_card(spec(), lora_file="my_lora.safetensors", widget=widget,
                                         receipt=RECEIPT))
    assert dev["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert dev["instance_prompt"] == "p3r5on"
    assert dev["tags"] == ["text-to-image", "flux", "lora", "diffusers", "template:sd-lora"]
    assert dev["widget"] == [{"text": "p3r5on portrait",
                              "output": {"url": "samples/1__000000020_0.jpg"}}]
    assert dev["license"] == "other" and dev["license_name"] == "flux-1-dev-non-commercial-license"
    card = render_model_card(spec("flux-schnell"), lora_file="my_lora.safetensors", widget=[],
                             receipt=RECEIPT)
    schnell = front_matter(card)
    assert schnell["license"] == "apache-2.0" and "license_name" not in schnell
    assert schnell["base_model"] == "black-forest-labs/FLUX.1-schnell"
    assert "load_lora_weights" in card and "`p3r5on`" in card
    custom = {**spec(), "base_model": {"name_or_path": "me/flux-fork", "variant": "schnell"}}
    assert front_matter(render_model_card(custom, lora_file="x", widget=[], receipt=RECEIPT))[
        "license"] == "apache-2.0"


def test_report_is_self_contained(tmp_path: Path) -> None:
    img = tmp_path / "1__000000010_0.jpg"
    Image.new("RGB", (300, 200), "red").save(img)
    page = render_report(
        name="my <lora>", state="done", loss_points=[(1, 0.9), (5, 0.5), (10, 0.2)],
        sample_grid={10: {0: img}}, prompts=["p3r5on <b>"],
        gate={"passed": True, "usable_count": 11, "image_count": 12, "excluded_count": 1,
              "totals": {"duplicate": 1}, "reasons": [], "warnings": ["few images"]},
        excluded=[{"source": "dup.jpg", "categories": ["duplicate"],
                   "details": {"duplicate": "same as a.jpg"}, "thumb": None}],
        validation={"ok": True}, receipt={**RECEIPT, "gpu": "x"})
    assert "<svg" in page and "<path d=\"M" in page
    assert "data:image/jpeg;base64," in page
    assert "my &lt;lora&gt;" in page and "p3r5on &lt;b&gt;" in page
    assert "duplicate: same as a.jpg" in page and "few images" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "Not enough" in loss_svg([(1, 0.5)])


def test_loss_points_and_grid(tmp_path: Path) -> None:
    loss = tmp_path / "loss.jsonl"
    loss.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.8}\nbroken\n'
                    '{"step": 2, "loss": 0.7}\n')
    assert read_loss_points(loss) == [(1, 1.0), (2, 0.7)]
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("1__000000000_0.jpg", "2__000000010_0.jpg", "2__000000010_1.jpg", "x.jpg"):
        (samples / name).write_bytes(b"")
    grid = sample_grid(samples)
    assert sorted(grid) == [0, 10] and sorted(grid[10]) == [0, 1]


def test_sha256sums_verify_with_sha256sum_and_detect_tampering(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    write_sha256sums(tmp_path)
    assert verify_sha256sums(tmp_path) == []
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "a.txt").write_text("b")
    (tmp_path / "extra").write_text("c")
    assert verify_sha256sums(tmp_path) == ["a.txt: checksum differs", "extra: not listed"]


def test_pack_run_assembles_the_bundle(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_dir / "output" / "my_lora"
    (out / "samples").mkdir(parents=True)
    (run_dir / "work" / "dataset").mkdir(parents=True)
    lora = out / "my_lora.safetensors"
    save_file({"a.lora_A.weight": np.ones((4, 8), np.float32),
               "a.lora_B.weight": np.ones((8, 4), np.float32)}, str(lora),
              metadata={"training_info": json.dumps({"step": 20})})
    for step in (0, 20):
        for idx in (0, 1):
            Image.new("RGB", (32, 32)).save(out / "samples" / f"17{step}__{step:09d}_{idx}.jpg")
    (run_dir / "work" / "dataset" / "a.txt").write_text("p3r5on, a photo")
    (run_dir / "work" / "dataset" / "a.png").write_bytes(b"")
    (run_dir / "work" / "quality_report.json").write_text('{"passed": true}')
    (run_dir / "work" / "loss.jsonl").write_text('{"step": 1, "loss": 1}\n'
                                                 '{"step": 2, "loss": 0.5}\n')
    config = run_dir / "work" / "config.yaml"
    config.write_text("job: extension\n")
    plan = make_plan(run_id="r1", spec=spec(), run_dir=str(run_dir), dataset_dir="/data",
                     provider="local", price_per_hour=0.5, billing_started_at=1000.0)
    status = blank_status("r1", 5.0)
    status["stages"]["train"].update(started_at=1010.0, ended_at=1070.5)
    files = pack_run(plan=plan, status=status, lora=lora, config_path=config,
                     dataset_dir=run_dir / "work" / "dataset",
                     prompts=["[trigger] portrait", "[trigger] cafe"],
                     hardware={"name": None, "count": 0, "cpu": "x86_64"},
                     train={"step": 20, "s_per_step": 0.1}, validation={"ok": True},
                     spend_usd=0.01, hours=0.02, state="done", ended_at=1100.0)
    publish = run_dir / "publish"
    assert set(files) >= {"my_lora.safetensors", "config.yaml", "run.yaml", "quality_report.json",
                          "captions/a.txt", "README.md", "receipt.json", "report.html",
                          "loss.jsonl", "samples/170__000000000_0.jpg",
                          "samples/1720__000000020_1.jpg"}
    assert "SHA256SUMS" not in files and (publish / "SHA256SUMS").is_file()
    assert "  loss.jsonl\n" in (publish / "SHA256SUMS").read_text()
    assert read_loss_points(publish / "loss.jsonl") == [(1, 1.0), (2, 0.5)]
    assert verify_sha256sums(publish) == []
    receipt = json.loads((publish / "receipt.json").read_text())
    assert receipt["state"] == "done" and receipt["steps"] == {"planned": 20, "done": 20}
    assert receipt["durations_s"]["train"] == 60.5 and receipt["price_per_hour"] == 0.5
    assert receipt["s_per_step"] == 0.1 and receipt["hardware"]["gpu"] == "none (CPU)"
    card = front_matter((publish / "README.md").read_text())
    assert [w["output"]["url"] for w in card["widget"]] == ["samples/1720__000000020_0.jpg",
                                                            "samples/1720__000000020_1.jpg"]
    assert card["widget"][0]["text"] == "p3r5on portrait"
    assert yaml.safe_load((publish / "run.yaml").read_text())["name"] == "my_lora"
    assert not list(run_dir.glob(".publish.partial"))
    assert stage_durations(status)["checks"] is None
