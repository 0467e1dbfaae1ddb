"""``flux-remote launch`` with the ``local`` provider: the README's demo path, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from controller.cli.main import app
from controller.run.fetch import parse_sums, verify_sums
from controller.journal import open_journal
from controller.errors import RunError

DEMO_DATA = Path(__file__).resolve().parents[1] / "configs" / "demo-data"


def write_spec(tmp_path: Path, *, provider: dict[str, Any] | None = None, steps: int = 8,
               name: str = "t1", budget: float = 1.0, **extra: Any) -> Path:
    """A tiny-trainer spec over a copy of the demo images (fast on a CPU)."""
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(DEMO_DATA, data)
    spec = {
        "name": name,
        "trigger_word": "d3m0",
        "dataset": {"path": str(data)},
        "captioning": {"mode": "template", "template": "a picture of [trigger]"},
        "quality_gate": {"min_images": 5, "min_short_side": 64},
        "training": {"trainer": "tiny", "steps": steps, "lr": 1e-3, "rank": 2,
                     "resolutions": [32], "optimizer": "adamw", "dtype": "fp32",
                     "quantize": False, "save_every": 4, "max_step_saves_to_keep": 2,
                     "sample": {"every": steps, "prompts": ["[trigger] red circle"], "steps": 1,
                                "width": 64, "height": 64}},
        "budget": {"max_usd": budget},
        "provider": provider or {"type": "local"},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_launch_local_end_to_end(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "bundle"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert f"bundle: {out}" in result.output.splitlines()
    assert verify_sums(out) >= 3
    names = {name for _, name in parse_sums((out / "SHA256SUMS").read_text())}
    assert "t1.safetensors" in names
    receipt = json.loads((out / "controller_receipt.json").read_text())
    assert receipt["provider"] == "local" and receipt["files_verified"] == len(names)
    assert receipt["idle_after_training_s"] is not None
    assert (out / "logs" / "agent.log").exists()
    # the calm view: a line per stage with its fact, no raw agent lines, nothing a person
    # would have to decode (Python reprs, None), here or in the agent's own log
    for line in ("ingest done in", "quality gate done in", "train 8/8 (100%)"):
        assert line in result.output, line
    assert "[agent" not in result.output and "create LoRA network" not in result.output
    agent_log = (out / "logs" / "agent.log").read_text()
    for text in (result.output, agent_log):
        assert "None" not in text and "{'" not in text

    journal = open_journal()
    [run] = journal.list_runs()
    assert run["state"] == "done" and run["bundle_path"] == str(out)
    [inst] = journal.instances(run["run_id"])
    assert inst["state"] == "destroyed"  # for own hardware: released
    states = [e["detail"]["state"] for e in journal.events(run["run_id"], kind="state")]
    assert states == ["planned", "renting", "shipping", "running", "fetching", "done"]
    assert run["step"] == 8 and run["log_offset"] > 0


def test_launch_detach_then_resume(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="t2")
    out = tmp_path / "out2"
    result = invoke("launch", spec, "--yes", "--detach", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["detached"] and data["state"] == "running"
    result = invoke("resume", data["run_id"][:12], "--poll-interval", "0.1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "done"
    assert verify_sums(out) >= 3
    result = invoke("logs", data["run_id"], "--tail", "3")
    assert result.exit_code == 0 and len(result.output.splitlines()) == 3


def test_dry_run_rents_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    result = invoke("launch", spec, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["provider"] == "local"
    assert open_journal().list_runs() == []


def test_json_without_yes_is_refused(tmp_path: Path) -> None:
    result = invoke("launch", write_spec(tmp_path), "--json")
    assert result.exit_code == 2
    assert "--yes" in json.loads(result.output)["message"]


def test_failed_gate_fails_the_run_and_fetches_logs(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="t3", quality_gate={"min_images": 500, "min_short_side": 64})
    out = tmp_path / "out3"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1", "-v")
    assert result.exit_code == 1, result.output
    assert "quality gate failed" in result.output
    assert "[agent" in result.output  # -v: the agent's raw lines too
    [run] = open_journal().list_runs()
    assert run["state"] == "failed" and run["error"]
    assert (out / "logs" / "agent.log").exists()
    assert open_journal().current_instance(run["run_id"]) is None


def test_verify_sums_catches_tampering(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "a.txt").write_text("hello")
    digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    (bundle / "SHA256SUMS").write_text(f"{digest}  a.txt\n")
    assert verify_sums(bundle) == 1
    (bundle / "a.txt").write_text("HELLO")
    with pytest.raises(RunError, match="a.txt: checksum differs"):
        verify_sums(bundle)
    (bundle / "SHA256SUMS").write_text(f"{digest}  ../a.txt\n{digest}  gone.txt\n")
    with pytest.raises(RunError) as info:
        verify_sums(bundle)
    assert "outside the bundle" in str(info.value) and "gone.txt: missing" in str(info.value)


@pytest.mark.slow
def test_readme_demo_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flux-remote launch configs/demo-local.yaml --yes`, run from a fresh folder."""
    config = Path(__file__).resolve().parents[1] / "configs" / "demo-local.yaml"
    monkeypatch.chdir(tmp_path)
    result = invoke("launch", config, "--yes", "--poll-interval", "0.2")
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "runs" / "demo-local"
    assert f"bundle: {bundle}" in result.output.splitlines()
    assert verify_sums(bundle) >= 3
