"""``flux-remote launch`` shows the machine checks its preflight passed (vast, ssh; not local)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from controller.run.launch import MachineCheck
from controller.ui import checks_line
from tests.fakevast import FakeVast
from tests.test_launch_local import invoke, write_spec


def render(checks: list[MachineCheck]) -> str:
    console = Console(file=io.StringIO(), width=100)
    console.print(checks_line(checks))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_checks_line_is_one_compact_line() -> None:
    checks = [MachineCheck("python", "3.11.7"), MachineCheck("ssh", "/usr/bin/ssh", brief="ok"),
              MachineCheck("rsync", "/usr/bin/rsync", brief="ok"),
              MachineCheck("Vast.ai key", "found", brief="ok"), MachineCheck("HF_TOKEN", "set")]
    assert render(checks) == ("checks: python 3.11.7 · ssh ok · rsync ok · Vast.ai key ok · "
                              "HF_TOKEN set\n")
    warning = MachineCheck("WANDB_API_KEY", "not set (WANDB_MODE=online)")  # ok, only a warning
    assert render([checks[0], warning]) == ("checks: python 3.11.7 · WANDB_API_KEY not set "
                                           "(WANDB_MODE=online)\n")
    assert MachineCheck("ssh", "/usr/bin/ssh", brief="ok").to_dict() == {
        "name": "ssh", "result": "/usr/bin/ssh", "ok": True}


def vast_flux_dev(tmp_path: Path) -> Path:
    """flux-dev on ai-toolkit over Vast: every machine check applies."""
    path = write_spec(tmp_path, provider={"type": "vast"}, budget=20.0)
    data = yaml.safe_load(path.read_text())
    data["training"]["trainer"] = "ai-toolkit"
    path.write_text(yaml.safe_dump(data))
    return path


def test_vast_launch_shows_the_checks_before_the_plan(tmp_path: Path, fake_vast: FakeVast,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_canary_checks_0123456789")
    path = vast_flux_dev(tmp_path)
    result = invoke("launch", path, "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    line = "checks: python "
    assert line in text and "ssh ok · rsync ok · Vast.ai key ok · HF_TOKEN set" in text
    assert text.index(line) < text.index("plan (vast)")
    assert "hf_canary" not in result.output

    result = invoke("launch", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)  # nothing but the JSON document on stdout
    assert [(c["name"], c["ok"]) for c in data["checks"]] == [
        ("python", True), ("ssh", True), ("rsync", True), ("Vast.ai key", True),
        ("HF_TOKEN", True)]
    assert data["checks"][-1]["result"] == "set" and "hf_canary" not in result.output
    assert not fake_vast.instances


def test_local_launch_shows_no_checks(tmp_path: Path) -> None:
    path = write_spec(tmp_path)
    result = invoke("launch", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "checks:" not in result.output and "plan (local)" in result.output
    data = json.loads(invoke("launch", path, "--dry-run", "--json").output)
    assert data["checks"] == []
