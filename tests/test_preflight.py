"""Before renting: what would only fail on the instance is refused on the laptop (exit 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_launch_local import invoke, write_spec

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo-data"


def _vast_spec(tmp_path: Path, **extra) -> Path:
    return write_spec(tmp_path, provider={"type": "vast"}, **extra)


def test_flux_dev_on_vast_without_hf_token_rents_nothing(tmp_path: Path, fake_vast,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", fake_vast.url)
    monkeypatch.setenv("VAST_API_KEY", fake_vast.api_key)
    path = _vast_spec(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["training"]["trainer"] = "ai-toolkit"
    path.write_text(yaml.safe_dump(data))
    result = invoke("launch", path, "--yes")
    assert result.exit_code == 2, result.output
    assert "HF_TOKEN" in result.output and "FLUX.1-dev is gated" in " ".join(result.output.split())
    assert not fake_vast.requests  # not even a search


def test_a_dataset_that_fails_the_gate_here_rents_nothing(tmp_path: Path, fake_vast,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", fake_vast.url)
    monkeypatch.setenv("VAST_API_KEY", fake_vast.api_key)
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    path = _vast_spec(tmp_path, quality_gate={"min_images": 50, "min_short_side": 64})
    result = invoke("launch", path, "--yes")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "fails the quality gate" in text and "nothing was rented" in text
    assert "flux-remote check-dataset" in text
    assert not fake_vast.requests


def test_local_runs_skip_the_laptop_gate(tmp_path: Path) -> None:
    from controller.run.launch import preflight
    from controller.spec.loader import load_spec

    spec = load_spec(write_spec(tmp_path, quality_gate={"min_images": 50, "min_short_side": 64}))
    assert [check.name for check in preflight(spec)] == ["python"]
