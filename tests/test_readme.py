"""The README's promises: its annotated run.yaml validates, its commands exist."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from controller.cli.main import app
from controller.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_annotated_run_yaml_validates(tmp_path: Path) -> None:
    block = re.search(r"### `run.yaml`, annotated.*?```yaml\n(.*?)```", README, re.S)
    assert block, "the README lost its annotated run.yaml"
    data = yaml.safe_load(block.group(1))
    assert data["dataset"]["path"] == "./photos"
    shutil.copytree(ROOT / "configs" / "demo-data", tmp_path / "photos")
    (tmp_path / "run.yaml").write_text(block.group(1), encoding="utf-8")
    spec = load_spec(tmp_path / "run.yaml")
    assert spec.name == "my-cat" and spec.budget.max_usd == 6.0


def test_every_command_in_the_table_exists() -> None:
    table = README[README.index("## Commands"):README.index("## Where results land")]
    commands = {m.group(1) for m in re.finditer(r"^\| `([a-z-]+)", table, re.M)}
    commands |= set(re.findall(r"`([a-z-]+) [A-Z\[]", table))
    assert {"launch", "plan", "validate", "render", "schema", "gc", "cost"} <= commands
    for command in sorted(commands):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"`flux-remote {command}` from the README: {result.output}"


def test_the_two_setup_commands_exist() -> None:
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "configs/demo-local.yaml" in (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
