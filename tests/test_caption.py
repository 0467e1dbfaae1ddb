"""The caption stage: sidecars kept byte for byte, missing ones filled, the trigger word added."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote.dataset.caption import caption, length_stats, render_template, with_trigger
from remote.dataset.ingest import ingest
from remote.dataset.quality import run_gate
from tests.fixtures_data import TRIGGER, HostileDataset


def captions_by_source(result) -> dict[str, bytes | None]:
    return {r.source: (r.caption_path.read_bytes() if r.caption_path else None)
            for r in result.images if r.path is not None and r.path.exists()}


def test_template_mode_keeps_sidecars_and_fills_the_rest(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    originals = {p.stem: p.read_bytes() for p in small_dataset.glob("*.txt")}
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="template", template="a photo of [trigger], high detail",
                     trigger=TRIGGER, caption_ext="txt")
    got = captions_by_source(result)
    for stem, data in originals.items():
        assert got[f"{stem}.jpg"] == data
    assert got["img_07.jpg"] == f"a photo of {TRIGGER}, high detail".encode()
    assert (report.kept, report.templated, report.trigger_inserted, report.missing) == (4, 8, 0, 0)
    stats = report.to_dict()["length_words"]
    assert stats["count"] == 12 and stats["min"] == 4 and stats["max"] == 6


def test_trigger_is_inserted_where_missing(small_dataset: Path, tmp_path: Path) -> None:
    (small_dataset / "img_05.txt").write_text("a woman in a hat", encoding="utf-8")
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="keep", template="", trigger=TRIGGER, caption_ext="txt")
    got = captions_by_source(result)
    assert got["img_05.jpg"] == f"{TRIGGER}, a woman in a hat".encode()
    assert report.trigger_inserted == 1
    assert (small_dataset / "img_05.txt").read_text(encoding="utf-8") == "a woman in a hat"

    again = ingest(small_dataset, tmp_path / "work2", workers=1)
    caption(again, mode="keep", template="", trigger=TRIGGER, caption_ext="txt",
            insert_trigger=False)
    assert captions_by_source(again)["img_05.jpg"] == b"a woman in a hat"


def test_keep_mode_leaves_missing_captions_for_the_gate(small_dataset: Path,
                                                        tmp_path: Path) -> None:
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="keep", template="x", trigger=TRIGGER, caption_ext="txt")
    assert report.missing == 8
    gate = run_gate(result, {}, caption_ext="txt")
    assert gate.totals["missing_caption"] == 8
    assert gate.passed  # missing_caption warns unless excluded


def test_model_mode_calls_the_injected_captioner_in_batches(small_dataset: Path,
                                                            tmp_path: Path) -> None:
    calls: list[int] = []

    def fake_captioner(images: list) -> list[str]:
        calls.append(len(images))
        assert all(im.mode == "RGB" for im in images)
        return [f"a  picture\nnumber {i}" for i in range(len(images))]

    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="model", template="unused", trigger=TRIGGER, caption_ext="txt",
                     model="fake/model", captioner=fake_captioner, batch_size=3)
    assert calls == [3, 3, 2]
    assert report.generated == 8 and report.kept == 4
    got = captions_by_source(result)
    assert got["img_04.jpg"] == f"{TRIGGER}, a picture number 0".encode()


def test_orphan_and_excluded_captions_are_not_used(hostile_dataset: HostileDataset,
                                                   tmp_path: Path) -> None:
    result = ingest(hostile_dataset.dir, tmp_path / "work", workers=1)
    report = caption(result, mode="template", template="a photo of [trigger]", trigger=TRIGGER,
                     caption_ext="txt")
    assert report.orphan_captions == ["orphan.txt"]
    assert not (result.dataset_dir / "orphan.txt").exists()
    tiny = next(r for r in result.images if r.source == "tiny.png")
    assert tiny.caption_path.exists()
    run_gate(result, {}, caption_ext="txt")
    assert not tiny.caption_path.exists() and not tiny.path.exists()
    names = {p.name for p in result.dataset_dir.iterdir()}
    stems_txt = {n[:-4] for n in names if n.endswith(".txt")}
    stems_img = {n.rsplit(".", 1)[0] for n in names if not n.endswith(".txt")}
    assert stems_txt == stems_img  # every caption has its image, every image its caption
    got = captions_by_source(result)
    assert got["good_00.jpg"] == hostile_dataset.captions["good_00.txt"]
    assert got["good_03.jpg"] == f"a photo of {TRIGGER}".encode()


def test_unknown_mode_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    with pytest.raises(ValueError):
        caption(result, mode="guess", template="", trigger=None, caption_ext="txt")


@pytest.mark.parametrize("text, expected, changed", [
    ("a dog", f"{TRIGGER}, a dog", True),
    (f"a {TRIGGER} dog", f"a {TRIGGER} dog", False),
    ("[trigger] dog", "[trigger] dog", False),
    ("  ", TRIGGER, True),
    (f"{TRIGGER}s dog", f"{TRIGGER}, {TRIGGER}s dog", True),
])
def test_with_trigger(text: str, expected: str, changed: bool) -> None:
    assert with_trigger(text, TRIGGER) == (expected, changed)


def test_template_without_trigger_and_stats() -> None:
    assert render_template("a photo of [trigger]", None) == "a photo of"
    assert render_template("[trigger], portrait", "zz") == "zz, portrait"
    assert length_stats([]) == {"count": 0, "min": None, "max": None, "mean": None, "median": None}
    assert length_stats([1, 2, 6]) == {"count": 3, "min": 1, "max": 6, "mean": 3.0, "median": 2}


def test_without_insert_trigger_a_placeholder_still_becomes_the_trigger_word(
        small_dataset: Path, tmp_path: Path) -> None:
    """insert_trigger: false keeps the trigger word out of ai-toolkit's config, whose get_caption
    would then drop a "[trigger]" (prompt_utils.py:716-718): the stage writes the word itself."""
    (small_dataset / "img_05.txt").write_text("[trigger] in a hat", encoding="utf-8")
    (small_dataset / "img_06.txt").write_text("a woman in a hat", encoding="utf-8")
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    caption(result, mode="keep", template="", trigger=TRIGGER, caption_ext="txt",
            insert_trigger=False)
    got = captions_by_source(result)
    assert got["img_05.jpg"] == f"{TRIGGER} in a hat".encode()
    assert got["img_06.jpg"] == b"a woman in a hat"
