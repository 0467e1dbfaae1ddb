"""The quality gate: each hostile file lands in its category; exclusions; the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remote.dataset.caption import caption
from remote.dataset.ingest import ingest
from remote.dataset.quality import gate_settings, run_gate, write_report
from tests.fixtures_data import TRIGGER, HostileDataset, make_photo


def hostile_gate(ds: HostileDataset, work: Path, gate: dict | None = None, **kwargs):
    result = ingest(ds.dir, work, workers=1)
    caption(result, mode="template", template="a photo of [trigger]", trigger=TRIGGER,
            caption_ext="txt")
    return result, run_gate(result, gate or {}, caption_ext="txt", **kwargs)


def test_each_hostile_file_lands_in_its_category(hostile_dataset: HostileDataset,
                                                 tmp_path: Path) -> None:
    result, report = hostile_gate(hostile_dataset, tmp_path / "work")
    entries = {e["source"]: e for e in report.entries}
    for name, category in hostile_dataset.expected.items():
        if category is None:
            assert entries[name]["categories"] == [], (name, entries[name]["details"])
            assert not entries[name]["excluded"], name
        else:
            assert category in entries[name]["categories"], (name, entries[name]["details"])
    assert "good_01.jpg" in entries["good_01_copy.jpg"]["details"]["duplicate"]
    assert "good_02.jpg" in entries["good_02_near.jpg"]["details"]["duplicate"]
    assert report.totals == {"corrupt": 3, "too_small": 1, "duplicate": 2, "blurry": 1,
                             "extreme_aspect": 1, "missing_caption": 0, "nsfw": 0}
    assert report.passed and report.reasons == []
    assert len(report.usable) == 15  # 22 files - 3 corrupt - tiny - 2 duplicates - panorama
    assert any("orphan.txt" in w for w in report.warnings)
    assert any(hostile_dataset.symlink in w for w in report.warnings)
    assert any(w.startswith("blurry:") for w in report.warnings)


def test_dataset_dir_holds_only_usable_images(hostile_dataset: HostileDataset,
                                              tmp_path: Path) -> None:
    result, report = hostile_gate(hostile_dataset, tmp_path / "work")
    images = {p.name for p in result.dataset_dir.iterdir() if p.suffix != ".txt"}
    assert images == {r.path.name for r in report.usable}
    assert "blurred.jpg" in images  # blurry only warns by default


def test_report_json_and_summary(hostile_dataset: HostileDataset, tmp_path: Path) -> None:
    _, report = hostile_gate(hostile_dataset, tmp_path / "work")
    path = tmp_path / "quality_report.json"
    write_report(report, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["passed"] is True and data["usable_count"] == 15 and data["image_count"] == 22
    assert data["totals"]["corrupt"] == 3
    entry = next(e for e in data["images"] if e["source"] == "truncated.jpg")
    assert entry["excluded"] and entry["details"]["corrupt"].startswith("truncated")
    text = report.summary()
    assert text.startswith("quality gate PASSED: 15 usable of 22 images")
    assert "corrupt 3" in text


def test_too_few_usable_images_fails(hostile_dataset: HostileDataset, tmp_path: Path) -> None:
    _, report = hostile_gate(hostile_dataset, tmp_path / "work", {"min_images": 16})
    assert not report.passed
    assert "only 15 usable images" in report.reasons[0]
    assert "FAILED" in report.summary()


def test_strict_fails_on_anything_excluded(hostile_dataset: HostileDataset,
                                           tmp_path: Path) -> None:
    _, report = hostile_gate(hostile_dataset, tmp_path / "work", {"strict": True})
    assert not report.passed
    assert report.reasons == ["strict mode: images in excluded categories "
                              "(corrupt 3, too_small 1, duplicate 2, extreme_aspect 1)"]


def test_exclude_list_decides_what_is_dropped(hostile_dataset: HostileDataset,
                                              tmp_path: Path) -> None:
    result, report = hostile_gate(hostile_dataset, tmp_path / "work",
                                  {"exclude": ["corrupt", "blurry"]})
    usable = {r.source for r in report.usable}
    assert "blurred.jpg" not in usable
    assert {"tiny.png", "good_01_copy.jpg", "panorama.jpg"} <= usable
    assert not (result.dataset_dir / "blurred.jpg").exists()


def test_disabled_gate_only_drops_what_cannot_be_read(hostile_dataset: HostileDataset,
                                                      tmp_path: Path) -> None:
    _, report = hostile_gate(hostile_dataset, tmp_path / "work", {"enabled": False,
                                                                  "strict": True})
    assert report.passed
    assert len(report.usable) == 19


def test_nsfw_hook(small_dataset: Path, tmp_path: Path) -> None:
    seen: list[list[Path]] = []

    def classifier(paths: list[Path]) -> list[float]:
        seen.append(paths)
        return [0.9 if p.stem == "img_05" else 0.1 for p in paths]

    result = ingest(small_dataset, tmp_path / "work", workers=1)
    allowed = run_gate(result, {}, caption_ext="txt", nsfw_classifier=classifier, prune=False)
    assert allowed.totals["nsfw"] == 0 and not seen  # allow_nsfw: the classifier is not run
    report = run_gate(result, {"allow_nsfw": False}, caption_ext="txt",
                      nsfw_classifier=classifier)
    assert report.totals["nsfw"] == 1
    assert "img_05.jpg" not in {r.source for r in report.usable}
    assert len(seen[0]) == 12


def test_nsfw_model_is_loaded_on_the_instance_only(small_dataset: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from remote.dataset import quality

    def no_transformers(name: str) -> None:
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(quality, "load_nsfw_classifier", no_transformers)
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    gate = {"allow_nsfw": False, "nsfw_model": "some/nsfw-model"}
    laptop = run_gate(result, gate, caption_ext="txt", load_models=False, prune=False)
    assert any(w.startswith("nsfw: not checked") for w in laptop.warnings)
    with pytest.raises(ValueError, match="some/nsfw-model"):
        run_gate(result, gate, caption_ext="txt")


def test_duplicates_keep_the_larger(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_photo(3, (320, 256)).save(src / "a_small.jpg", quality=92)
    make_photo(3, (320, 256)).resize((640, 512)).save(src / "b_large.jpg", quality=92)
    result = ingest(src, tmp_path / "work", workers=1)
    report = run_gate(result, {"min_images": 1, "blur_threshold": 0}, caption_ext="txt")
    assert [r.source for r in report.usable] == ["b_large.jpg"]
    dup = next(e for e in report.entries if e["source"] == "a_small.jpg")
    assert dup["details"]["duplicate"].startswith("duplicate of b_large.jpg")


def test_gate_settings_are_checked() -> None:
    assert gate_settings(None)["min_images"] == 5
    with pytest.raises(ValueError, match="min_imags"):
        gate_settings({"min_imags": 3})
    with pytest.raises(ValueError, match="ugly"):
        gate_settings({"exclude": ["ugly"]})
    for bad in ({"min_images": "5"}, {"exclude": "blurry"}, {"strict": 1},
                {"blur_threshold": -1}, {"nsfw_model": 3}):
        with pytest.raises(ValueError, match="quality_gate"):
            gate_settings(bad)


def test_defaults_match_the_spec_model() -> None:
    from controller.spec.model import QualityGateSpec

    assert gate_settings(None) == QualityGateSpec().model_dump(mode="json")
