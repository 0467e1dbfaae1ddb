"""``flux-remote init PHOTOS_DIR``: a commented run.yaml that validates, never over a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from controller.cli.main import app
from controller.starter import suggest_name, suggest_trigger
from tests.fakevast import FakeVast

runner = CliRunner()


def photos(folder: Path, count: int = 6, *, side: int = 320, captions: int = 0) -> Path:
    folder.mkdir(parents=True)
    for n in range(count):
        image = Image.new("RGB", (side, side), (40 * n % 256, 90, 160))
        for x in range(0, side, 8):  # sharp edges: not "blurry", no two alike
            for y in range(n * 5 % side, side, 16):
                image.putpixel((x, y), (255, 255, 255))
        image.save(folder / f"img{n}.png")
        if n < captions:
            (folder / f"img{n}.txt").write_text(f"a photo of a thing, number {n}")
    return folder


@pytest.fixture
def no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no vastai key file either


def test_init_writes_a_commented_spec_that_validates(tmp_path: Path, no_key: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = photos(tmp_path / "My Photos", captions=2)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", str(folder)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "run.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["name"] == "my-photos" and data["trigger_word"] == "myph0"
    assert data["dataset"]["path"] == "My Photos"  # relative to the file
    assert data["captioning"]["mode"] == "template"
    assert "# 2 of 6 images have a .txt caption" in text
    assert "PASSED: 6 usable of 6 images" in text and "No Vast.ai key" in text
    assert data["budget"]["max_usd"] == 8
    assert "None" not in text
    check = runner.invoke(app, ["validate", "run.yaml"])
    assert check.exit_code == 0, check.output
    assert "6 images" in check.output


def test_every_image_captioned_keeps_the_captions(tmp_path: Path, no_key: None) -> None:
    folder = photos(tmp_path / "anna", captions=6)
    out = tmp_path / "specs" / "anna.yaml"
    result = runner.invoke(app, ["init", str(folder), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["captions"] == "keep" and data["estimate"] is None and data["gate_passed"]
    spec = yaml.safe_load(out.read_text())
    assert spec["captioning"]["mode"] == "keep" and spec["dataset"]["path"] == "../anna"
    assert "flux-remote validate anna.yaml" in out.read_text()
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0


def test_a_failing_gate_is_written_down_and_the_file_still_validates(tmp_path: Path,
                                                                     no_key: None) -> None:
    folder = photos(tmp_path / "small", count=3, side=64)
    out = tmp_path / "run.yaml"
    result = runner.invoke(app, ["init", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "FAILED: 0 usable of 3 images; flagged: too small 3" in result.output
    text = out.read_text()
    assert "#   FAILED: 0 usable of 3 images" in text and "quality_gate.min_images" in text
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0


def test_init_never_overwrites_and_refuses_a_folder_without_images(tmp_path: Path,
                                                                   no_key: None) -> None:
    folder = photos(tmp_path / "p")
    out = tmp_path / "run.yaml"
    out.write_text("name: mine\n")
    result = runner.invoke(app, ["init", str(folder), "--out", str(out)])
    assert result.exit_code == 2 and "exists" in result.output
    assert out.read_text() == "name: mine\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["init", str(empty), "--out", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "no images" in result.output
    result = runner.invoke(app, ["init", str(tmp_path / "nope"), "--out", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "no such folder" in result.output
    assert not (tmp_path / "b.yaml").exists() and not (tmp_path / "c.yaml").exists()


def test_with_a_vast_key_the_cheapest_estimate_sets_the_budget(tmp_path: Path,
                                                               fake_vast: FakeVast) -> None:
    folder = photos(tmp_path / "p")
    out = tmp_path / "run.yaml"
    result = runner.invoke(app, ["init", str(folder), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    est = data["estimate"]
    assert est["problem"] is None and est["offer_id"] and est["est_usd"] > 0
    assert data["budget_usd"] == max(2, -(-est["est_usd"] * 2 // 1))
    text = out.read_text()
    assert f"# Cheapest now: offer {est['offer_id']} ({est['gpu_name']}" in text
    assert yaml.safe_load(text)["budget"]["max_usd"] == data["budget_usd"]
    assert len(fake_vast.calls("POST", "/api/v0/bundles/")) == 1
    assert not fake_vast.calls("PUT") and not fake_vast.instances  # nothing rented
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0


def test_names_and_trigger_words() -> None:
    assert suggest_name(Path("/x/Anna Smith (2024)")) == "anna-smith-2024"
    assert suggest_name(Path("/x/!!!")) == "my-lora"
    assert suggest_name(Path("/x/" + "a" * 80)) == "a" * 63
    assert suggest_trigger("demo") == "d3m0" and suggest_trigger("rhythm") == "rhyth7"
    assert suggest_trigger("1234") == "5ubj"


def test_a_folder_name_cannot_inject_yaml(tmp_path: Path, no_key: None) -> None:
    folder = photos(tmp_path / 'evil\nbudget: {max_usd: 9999}\n"#')
    out = tmp_path / "run.yaml"
    result = runner.invoke(app, ["init", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    assert data["budget"]["max_usd"] == 8 and data["name"] == "evil-budget-max_usd-9999"
    assert (tmp_path / data["dataset"]["path"]).resolve() == folder.resolve()
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0
