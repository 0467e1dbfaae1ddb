"""``flux-remote validate | render | schema``: thin commands over the loader and the generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controller.cli.main import app

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def bad_spec(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok\ndataset: {path: nowhere}\nbudget:\n  max_usd: -1\n")
    return path


def test_validate_summarises_the_run(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(CONFIGS / "demo-local.yaml")])
    assert result.exit_code == 0, result.output
    assert "demo-local" in result.stdout and "tiny 80 steps" in result.stdout
    assert "12 images" in result.stdout


def test_validate_lists_the_runs_of_a_batch(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(CONFIGS / "batch-sweep.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["batch"]["max_usd"] == 30
    assert [run["name"] for run in data["runs"]] == [
        "my-sweep-lr1e-4-rank16", "my-sweep-lr1e-4-rank32", "my-sweep-lr4e-4-rank16",
        "my-sweep-lr4e-4-rank32"]
    assert data["runs"][2]["lr"] == 4e-4 and data["runs"][2]["rank"] == 16


def test_validate_reports_located_errors_and_exits_2(runner: CliRunner, bad_spec: Path) -> None:
    result = runner.invoke(app, ["validate", str(bad_spec)])
    assert result.exit_code == 2
    assert f"{bad_spec}:2:17: dataset.path: no such folder" in result.stderr
    assert f"{bad_spec}:4:12: budget.max_usd: Input should be greater than 0" in result.stderr
    assert result.stdout == ""


def test_validate_json_error(runner: CliRunner, bad_spec: Path) -> None:
    result = runner.invoke(app, ["validate", str(bad_spec), "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"] == "SpecError"
    assert "budget.max_usd" in data["message"]


def test_render_prints_the_ai_toolkit_yaml_for_the_instance(runner: CliRunner) -> None:
    result = runner.invoke(app, ["render", str(CONFIGS / "flux-dev-vast.yaml")])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    process = cfg["config"]["process"][0]
    assert cfg["job"] == "extension" and cfg["config"]["name"] == "my-flux-lora"
    assert process["datasets"][0]["folder_path"] == "/workspace/flux-remote/<run_id>/work/dataset"
    assert process["training_folder"] == "/workspace/flux-remote/<run_id>/output"
    assert process["save"]["push_to_hub"] is False
    assert process["train"]["noise_offset"] == 0.0  # the config's override


def test_render_local_tiny_run(runner: CliRunner) -> None:
    result = runner.invoke(app, ["render", str(CONFIGS / "demo-local.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["runs"]
    process = run["config"]["config"]["process"][0]
    assert process["device"] == "cpu"
    assert process["datasets"][0]["folder_path"] == "<local run dir>/work/dataset"
    assert process["datasets"][0]["resolution"] == [64]


def test_render_batch_all_runs_or_one(runner: CliRunner) -> None:
    result = runner.invoke(app, ["render", str(CONFIGS / "batch-sweep.yaml")])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [doc["config"]["process"][0]["network"]["linear"] for doc in docs] == [16, 32, 16, 32]
    one = runner.invoke(app, ["render", str(CONFIGS / "batch-sweep.yaml"), "--run",
                              "my-sweep-lr4e-4-rank32"])
    assert one.exit_code == 0, one.output
    assert yaml.safe_load(one.stdout)["config"]["process"][0]["train"]["lr"] == 4e-4
    missing = runner.invoke(app, ["render", str(CONFIGS / "batch-sweep.yaml"), "--run", "nope"])
    assert missing.exit_code == 2 and "no run named 'nope'" in missing.stderr


def test_render_bad_spec_exits_2(runner: CliRunner, bad_spec: Path) -> None:
    result = runner.invoke(app, ["render", str(bad_spec)])
    assert result.exit_code == 2 and "dataset.path" in result.stderr


def test_schema_is_json_schema_with_the_batch_section(runner: CliRunner) -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["title"] == "flux-remote run spec"
    assert "batch" in schema["properties"] and "BatchSpec" in schema["$defs"]
    assert json.loads(runner.invoke(app, ["schema", "--json"]).stdout) == schema


def test_help_lists_the_spec_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "render", "schema"):
        assert command in result.stdout
    for command in ("validate", "render", "schema"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
