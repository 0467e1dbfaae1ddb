"""``python -m remote check-dataset`` and ``flux-remote check-dataset``: exit 0 pass, 1 fail,
2 bad input; a readable summary or the full report as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from remote.__main__ import main as remote_main
from tests.fixtures_data import TRIGGER, HostileDataset


def test_agent_command_passes_a_good_folder(small_dataset: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert remote_main(["check-dataset", str(small_dataset), "--trigger", TRIGGER]) == 0
    out = capsys.readouterr().out
    assert "quality gate PASSED: 12 usable of 12 images" in out
    assert "captions: 4 kept, 0 trigger added, 8 from template, 0 missing" in out


def test_agent_command_json_and_failure(hostile_dataset: HostileDataset,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = remote_main(["check-dataset", str(hostile_dataset.dir), "--json",
                        "--gate", json.dumps({"min_images": 40})])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert report["gate"]["totals"]["corrupt"] == 3
    assert report["gate"]["settings"]["min_images"] == 40
    assert report["captions"]["orphan_captions"] == ["orphan.txt"]


@pytest.mark.parametrize("args", [
    ["check-dataset", "/no/such/folder"],
    ["check-dataset", ".", "--gate", "{not json"],
    ["check-dataset", ".", "--gate", '{"min_imags": 3}'],
    ["check-dataset", ".", "--gate", "[1]"],
])
def test_agent_command_bad_input(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert remote_main(args) == 2
    assert "check-dataset:" in capsys.readouterr().err


def test_agent_command_runs_as_a_module(small_dataset: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "remote", "check-dataset", str(small_dataset),
                          "--json"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gate"]["usable_count"] == 12


def test_controller_command_renders_a_table(hostile_dataset: HostileDataset) -> None:
    result = CliRunner().invoke(app, ["check-dataset", str(hostile_dataset.dir)])
    assert result.exit_code == 0, result.output
    assert "corrupt" in result.output and "excluded" in result.output
    assert "$(touch pwned).jpg" not in result.output  # good images are not listed
    assert "truncated.jpg" in result.output
    assert "PASSED" in result.output


def test_controller_command_json(small_dataset: Path) -> None:
    result = CliRunner().invoke(app, ["check-dataset", str(small_dataset), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] is True and data["source"] == str(small_dataset)


def test_controller_command_takes_thresholds_from_a_spec(hostile_dataset: HostileDataset,
                                                         tmp_path: Path) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "name: demo\n"
        f"trigger_word: {TRIGGER}\n"
        f"dataset:\n  path: {hostile_dataset.dir.name}\n"
        "quality_gate:\n  min_images: 16\n"
        "budget:\n  max_usd: 5\n",
        encoding="utf-8",
    )
    assert hostile_dataset.dir.parent == tmp_path  # the spec names it relative to its folder
    result = CliRunner().invoke(app, ["check-dataset", str(spec), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["gate"]["settings"]["min_images"] == 16
    assert data["gate"]["reasons"][0].startswith("only 15 usable images")


def test_controller_command_bad_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["check-dataset", str(tmp_path / "missing")])
    assert result.exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["check-dataset", str(bad)])
    assert result.exit_code == 2
