"""Batch files: expansion, run names, and errors pointing at the override that caused them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from controller.batch.spec import apply_override, expand, safe_name, value_slug
from controller.errors import SpecError
from controller.spec.model import NAME_RE
from controller.spec.loader import load_file, load_spec

BASE = {"name": "lora", "training": {"lr": 1e-4, "rank": 16, "sample": {"steps": 20}}}


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    for folder in ("data", "other"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), (30, 90, 200)).save(tmp_path / folder / "a.jpg")
    return tmp_path


def _write(spec_dir: Path, text: str) -> Path:
    path = spec_dir / "batch.yaml"
    path.write_text(text)
    return path


def test_sweep_is_a_cartesian_product_with_readable_names() -> None:
    runs = expand(BASE, {"sweep": {"training.lr": [1e-4, 4e-4], "training.rank": [16, 32]}})
    assert [run.name for run in runs] == ["lora-lr1e-4-rank16", "lora-lr1e-4-rank32",
                                          "lora-lr4e-4-rank16", "lora-lr4e-4-rank32"]
    assert runs[3].data["training"] == {"lr": 4e-4, "rank": 32, "sample": {"steps": 20}}
    assert runs[3].data["name"] == "lora-lr4e-4-rank32"
    assert runs[1].origins[("training", "rank")] == ("batch", "sweep", "training.rank", 1)


def test_sweep_keys_with_the_same_last_part_keep_their_path() -> None:
    runs = expand(BASE, {"sweep": {"training.sample.steps": [4], "training.steps": [100]}})
    assert runs[0].name == "lora-training_sample_steps4-training_steps100"


def test_runs_list_uses_index_names_or_the_runs_own_name() -> None:
    runs = expand(BASE, {"runs": [{"training": {"lr": 2e-4}}, {"name": "mine", "training.rank": 8}]})
    assert [run.name for run in runs] == ["lora-1", "mine"]
    assert runs[0].data["training"] == {"lr": 2e-4, "rank": 16, "sample": {"steps": 20}}  # merged
    assert runs[1].data["training"]["rank"] == 8
    assert BASE["training"]["rank"] == 16  # the base is never modified


def test_long_names_are_truncated_with_a_hash_and_stay_valid_and_distinct() -> None:
    base = {"name": "a-rather-long-base-name-for-a-flux-lora-experiment"}
    runs = expand(base, {"sweep": {"training.gradient_accumulation_steps": [1, 2],
                                   "training.resolutions": [[512, 768, 1024], [1024]]}})
    names = [run.name for run in runs]
    assert len(set(names)) == 4
    assert all(NAME_RE.match(name) and len(name) <= 63 for name in names), names
    assert safe_name("x" * 80) != safe_name("x" * 81)


def test_repeated_generated_names_get_a_suffix() -> None:
    runs = expand({"name": "lora"}, {"sweep": {"training.optimizer": ["adam w", "adam/w"]}})
    assert [run.name for run in runs] == ["lora-optimizeradam_w", "lora-optimizeradam_w-2"]


@pytest.mark.parametrize("value, slug", [(1e-4, "1e-4"), (4e-4, "4e-4"), (0.5, "0p5"), (16, "16"),
                                         ("1e-4", "1e-4"), (True, "on"), ([512, 768], "512_768"),
                                         (1.5e-4, "1p5e-4"), ("a b/c", "a_b_c")])
def test_value_slug(value: object, slug: str) -> None:
    assert value_slug(value) == slug


def test_apply_override_merges_mappings_and_replaces_the_rest() -> None:
    data = {"training": {"lr": 1, "resolutions": [512, 768]}}
    apply_override(data, ("training",), {"rank": 4, "resolutions": [256]})
    apply_override(data, ("gpu", "names"), ["RTX 4090"])
    assert data == {"training": {"lr": 1, "rank": 4, "resolutions": [256]}, "gpu": {"names": ["RTX 4090"]}}


def test_batch_file_loads_every_run_fully_validated(spec_dir: Path) -> None:
    path = _write(spec_dir, """\
batch:
  max_usd: 20
  max_parallel: 2
  runs:
    - {name: first, training.steps: 100}
    - dataset: {path: other}
name: lora
dataset: {path: data}
budget: {max_usd: 5}
""")
    loaded = load_file(path)
    assert loaded.batch is not None and loaded.batch.max_parallel == 2
    assert [spec.name for spec in loaded.runs] == ["first", "lora-2"]
    assert loaded.runs[0].training.steps == 100
    assert loaded.runs[1].dataset.path == spec_dir / "other"
    assert loaded.labels == ["batch.runs[0]", "batch.runs[1]"]


def test_error_in_one_run_points_at_its_override(spec_dir: Path) -> None:
    path = _write(spec_dir, """\
batch:
  max_usd: 20
  runs:
    - training: {steps: 100}
    - training:
        rnak: 8
    - dataset: {path: missing}
name: lora
dataset: {path: data}
budget: {max_usd: 5}
""")
    with pytest.raises(SpecError) as info:
        load_file(path)
    problems = info.value.problems
    assert any(p.startswith(f"{path}:6:9: training.rnak: unknown key 'rnak'; did you mean 'rank'?")
               and "(in batch.runs[1])" in p for p in problems), problems
    assert any(p.startswith(f"{path}:7:23: dataset.path: no such folder") for p in problems), problems


def test_error_in_the_base_is_reported_once(spec_dir: Path) -> None:
    path = _write(spec_dir, """\
batch:
  max_usd: 20
  sweep: {training.rank: [4, 8, 16]}
name: lora
dataset: {path: data}
training: {steps: -1}
budget: {max_usd: 5}
""")
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert info.value.problems == [
        f"{path}:6:19: training.steps: Input should be greater than or equal to 1 (got -1)"]


def test_sweep_value_of_the_wrong_type_points_at_the_value(spec_dir: Path) -> None:
    path = _write(spec_dir, """\
batch:
  max_usd: 20
  sweep:
    training.rank: [4, many]
name: lora
dataset: {path: data}
budget: {max_usd: 5}
""")
    with pytest.raises(SpecError, match=rf"{path}:4:24: training.rank: .*valid integer"):
        load_file(path)


def test_two_runs_with_the_same_name_are_an_error(spec_dir: Path) -> None:
    path = _write(spec_dir, """\
batch:
  max_usd: 20
  runs:
    - name: same
    - name: same
name: lora
dataset: {path: data}
budget: {max_usd: 5}
""")
    with pytest.raises(SpecError, match=rf"{path}:5:13: name: two runs are named 'same'"):
        load_file(path)


def test_load_spec_refuses_a_batch_file(spec_dir: Path) -> None:
    path = _write(spec_dir, "batch: {max_usd: 9, runs: [{}]}\nname: lora\ndataset: {path: data}\n"
                            "budget: {max_usd: 5}\n")
    with pytest.raises(SpecError, match=rf"{path}:1:8: batch: this is a batch file of 1 runs"):
        load_spec(path)


def test_a_batch_needs_a_base_name_unless_every_run_has_one(spec_dir: Path) -> None:
    body = "dataset: {path: data}\nbudget: {max_usd: 5}\n"
    path = _write(spec_dir, "batch: {max_usd: 9, sweep: {training.rank: [4, 8]}}\n" + body)
    with pytest.raises(SpecError, match=rf"{path}:1:1: name: required field is missing"):
        load_file(path)
    path = _write(spec_dir, "batch: {max_usd: 9, runs: [{name: a}, {name: b}]}\n" + body)
    assert [spec.name for spec in load_file(path).runs] == ["a", "b"]
