"""Weights & Biases: the tiny trainer logs loss, lr, s/step, samples and summaries, offline.

``WANDB_MODE=offline`` (set for every test by conftest) makes wandb write the run under
``<output>/wandb/offline-run-*/``: a ``run-<id>.wandb`` record log plus the sample images under
``files/media``. The record log is LevelDB's log format holding wandb protobuf records; the small
reader below decodes it with wandb's own protobuf classes, so the test sees exactly what
``wandb sync`` would upload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from remote.aitk_config import build_aitk_config
from remote.wandb_log import (RUN_FILE, WandbLogger, add_summary, find_run_url, known_run_url,
                              logging_section, main, quality_summary, receipt_summary,
                              summarize_run, trainer_env, url_in_line)
from tests.test_tiny_trainer import write_job

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed")

KEY_CANARY = "wandb_canary_key_0123456789abcdef01234567"
BLOCK = 32768  # LevelDB log block size, as wandb writes it
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too small for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read_run(path: Path) -> dict[str, Any]:
    """History rows, the final summary and the run record of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, str] = {}
    for raw in _chunks(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                if item.key:
                    summary[item.key] = json.loads(item.value_json)
        elif kind == "run":
            run = {"id": record.run.run_id, "project": record.run.project,
                   "name": record.run.display_name}
    return {"history": history, "summary": summary, "run": run}


def offline_runs(output: Path) -> list[Path]:
    """Record logs under ``output``, oldest first (the summary's live in ``summary/wandb``)."""
    return sorted(output.rglob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def wandb_job(root: Path, *, steps: int = 12, use_wandb: bool = True) -> Path:
    """A tiny-trainer job whose ``logging`` section is the one aitk_config writes."""
    config = write_job(root, steps=steps, save_every=6, sample_every=6)
    job = yaml.safe_load(config.read_text(encoding="utf-8"))
    if use_wandb:
        job["config"]["process"][0]["logging"] = {"log_every": 1, "use_wandb": True,
                                                  "project_name": "loras", "run_name": "demo-run"}
    config.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    (root / "quality_report.json").write_text(json.dumps(
        {"passed": True, "usable_count": 12, "image_count": 12, "excluded_count": 0,
         "totals": {"blurry": 0}, "reasons": [], "warnings": [], "images": []}), encoding="utf-8")
    return config


def flush_wandb() -> None:
    """Stop wandb's service process: it writes the record log in the background, and only its
    shutdown guarantees that the file is complete (the trainer process gets this at exit)."""
    import wandb

    wandb.teardown()


def train(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from remote.trainers import tiny

    assert tiny.main([str(config)]) == 0
    flush_wandb()
    return capsys.readouterr().out


@needs_wandb
def test_tiny_trainer_logs_metrics_samples_and_quality(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY_CANARY)
    config = wandb_job(tmp_path)
    train(config, capsys)
    output = tmp_path / "output" / "demo"
    [record_log] = offline_runs(output)
    data = read_run(record_log)
    assert data["run"]["project"] == "loras" and data["run"]["name"] == "demo-run"
    steps = defaultdict(dict)
    for row in data["history"]:
        steps[row["_step"]].update(row)
    losses = {step: row["train/loss"] for step, row in steps.items() if "train/loss" in row}
    assert sorted(losses) == list(range(1, 13))
    assert all(v > 0 for v in losses.values())
    assert steps[12]["train/lr"] == pytest.approx(1e-4)
    assert steps[12]["train/s_per_step"] > 0
    sample_steps = sorted(step for step, row in steps.items() if "samples/_type" in row)
    assert sample_steps == [0, 6, 12]
    assert steps[6]["samples/count"] == 2
    assert steps[6]["samples/captions"] == ["sks on a table", "sks at night"]
    media = list(record_log.parent.glob("files/media/images/samples_*"))
    assert len(media) == 6
    assert data["summary"]["quality/passed"] is True
    assert data["summary"]["quality/usable_count"] == 12

    known = json.loads((output / RUN_FILE).read_text(encoding="utf-8"))
    assert known["id"] == data["run"]["id"] and known["project"] == "loras" and known["offline"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY_CANARY.encode() not in path.read_bytes(), path


@needs_wandb
def test_resumed_training_continues_the_same_run(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = wandb_job(tmp_path, steps=6)
    train(config, capsys)
    job = yaml.safe_load(config.read_text(encoding="utf-8"))
    job["config"]["process"][0]["train"]["steps"] = 12
    config.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    out = train(config, capsys)
    assert "Found step 6 in metadata" in out
    first, second = (read_run(p) for p in offline_runs(tmp_path / "output" / "demo"))
    assert first["run"]["id"] == second["run"]["id"]
    resumed = sorted(row["_step"] for row in second["history"] if "train/loss" in row)
    assert resumed == list(range(7, 13))


@needs_wandb
def test_wandb_run_id_comes_from_the_environment(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "myrun-20261129")
    train(wandb_job(tmp_path, steps=3), capsys)
    [record_log] = offline_runs(tmp_path / "output" / "demo")
    assert read_run(record_log)["run"]["id"] == "myrun-20261129"


def test_disabled_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(wandb_job(tmp_path, steps=3, use_wandb=False), capsys)
    output = tmp_path / "output" / "demo"
    assert not (output / "wandb").exists() and not (output / RUN_FILE).exists()


def test_missing_wandb_is_a_warning_not_a_failure(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    warnings: list[str] = []
    logger = WandbLogger.start({"use_wandb": True}, output_dir=tmp_path, name="x",
                               warn=warnings.append)
    assert not logger.active and "not installed" in warnings[0]
    logger.log_step(1, loss=0.5, lr=1e-4, s_per_step=0.1)
    logger.log_samples(1, [(tmp_path / "a.jpg", "p")])
    logger.summary({"a": 1})
    logger.finish()


def test_a_failing_log_call_switches_logging_off() -> None:
    class Broken:
        def log(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("network down")

    warnings: list[str] = []
    logger = WandbLogger(Broken(), warn=warnings.append)
    logger.log_step(1, loss=0.5, lr=1e-4, s_per_step=None)
    assert not logger.active and "network down" in warnings[0]
    logger.log_step(2, loss=0.5, lr=1e-4, s_per_step=None)
    assert len(warnings) == 1


@needs_wandb
def test_receipt_summary_is_added_to_the_finished_run(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    train(wandb_job(tmp_path, steps=3), capsys)
    output = tmp_path / "output" / "demo"
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"state": "done", "provider": "local", "spend_usd": 0.0123,
                                   "hours": 0.01, "steps": {"planned": 3, "done": 3},
                                   "hardware": {"gpu": "none (CPU)"}}), encoding="utf-8")
    assert add_summary(output, [receipt, tmp_path / "quality_report.json",
                                tmp_path / "missing.json"])
    flush_wandb()
    runs = [read_run(p) for p in offline_runs(output)]
    assert len({r["run"]["id"] for r in runs}) == 1
    summary = runs[-1]["summary"]
    assert summary["receipt/spend_usd"] == 0.0123 and summary["receipt/gpu"] == "none (CPU)"
    assert summary["quality/passed"] is True
    assert not add_summary(tmp_path / "nowhere", [receipt])


@needs_wandb
def test_summary_command_reopens_the_run_named_by_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ai-toolkit's case: no run file, the agent started the trainer with WANDB_RUN_ID."""
    monkeypatch.setenv("WANDB_RUN_ID", "aitk-run-1")
    monkeypatch.setenv("WANDB_PROJECT", "loras")
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"state": "stopped", "spend_usd": 1.25,
                                   "hardware": {"gpu": "RTX 4090"}}), encoding="utf-8")
    assert main(["summary", str(tmp_path / "out"), str(receipt)]) == 0
    flush_wandb()
    [record_log] = offline_runs(tmp_path / "out")
    data = read_run(record_log)
    assert data["run"]["id"] == "aitk-run-1" and data["run"]["project"] == "loras"
    assert data["summary"]["receipt/state"] == "stopped"
    assert data["summary"]["receipt/spend_usd"] == 1.25
    assert main(["summary", str(tmp_path / "out")]) == 2


def test_logging_section_reads_what_the_config_generator_writes(tmp_path: Path) -> None:
    spec = {"name": "lora1", "trigger_word": "tok", "dataset": {"path": "x"},
            "training": {"steps": 400}, "wandb": {"enabled": True, "project": "p1"}}
    job = build_aitk_config(spec, dataset_dir=str(tmp_path), training_folder=str(tmp_path))
    section = logging_section(job)
    assert section["use_wandb"] is True and section["project_name"] == "p1"
    assert section["run_name"] == "lora1" and section["log_every"] >= 1
    spec["wandb"]["enabled"] = False
    off = build_aitk_config(spec, dataset_dir=str(tmp_path), training_folder=str(tmp_path))
    assert not logging_section(off).get("use_wandb")
    assert logging_section({"config": {}}) == {}


def test_summaries_keep_the_headline_only() -> None:
    assert quality_summary({"passed": False, "usable_count": 3, "images": [1, 2]}) == {
        "quality/passed": False, "quality/usable_count": 3}
    assert receipt_summary({"state": "done", "hardware": {"gpu": "RTX 4090"}, "hours": 1.5,
                            "steps": {"done": 2000}, "instance": {"id": 1}}) == {
        "receipt/state": "done", "receipt/gpu": "RTX 4090", "receipt/hours": 1.5,
        "receipt/steps_done": 2000}


@pytest.mark.parametrize("line, url", [
    ("wandb: \U0001f680 View run at https://wandb.ai/me/loras/runs/abc123",
     "https://wandb.ai/me/loras/runs/abc123"),
    ("wandb: run abc123 at https://wandb.ai/me/loras/runs/abc123\r",
     "https://wandb.ai/me/loras/runs/abc123"),
    ("wandb: View project at https://wandb.ai/me/loras", None),
    ("see https://wandb.ai/me/loras/runs/abc123", None),
])
def test_url_in_line(line: str, url: str | None) -> None:
    assert url_in_line(line) == url


def test_known_run_url(tmp_path: Path) -> None:
    assert known_run_url(tmp_path) is None
    (tmp_path / RUN_FILE).write_text(json.dumps({"id": "a", "url": "https://wandb.ai/x/y/runs/a"}))
    assert known_run_url(tmp_path) == "https://wandb.ai/x/y/runs/a"


def test_find_run_url_prefers_the_run_file_then_the_log(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text("step 1\nwandb: \U0001f680 View run at https://wandb.ai/me/p/runs/r1\n",
                   encoding="utf-8")
    assert find_run_url(tmp_path / "out", log) == "https://wandb.ai/me/p/runs/r1"
    assert find_run_url(tmp_path / "out", tmp_path / "missing.log") is None
    assert find_run_url(tmp_path / "out") is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RUN_FILE).write_text(json.dumps({"url": "https://wandb.ai/x/y/runs/t"}))
    assert find_run_url(tmp_path / "out", log) == "https://wandb.ai/x/y/runs/t"


def test_trainer_env_names_the_run_and_keeps_what_is_set(tmp_path: Path) -> None:
    spec = {"wandb": {"enabled": True, "project": "loras", "entity": "team"}}
    env = trainer_env(spec, "run-20261129-1", tmp_path, {"WANDB_DIR": "/elsewhere"})
    assert env == {"WANDB_RUN_ID": "run-20261129-1", "WANDB_RESUME": "allow",
                   "WANDB_PROJECT": "loras", "WANDB_ENTITY": "team"}
    assert trainer_env({"wandb": {"enabled": False}}, "r", tmp_path, {}) == {}
    assert KEY_CANARY not in json.dumps(trainer_env(spec, "r", tmp_path,
                                                    {"WANDB_API_KEY": KEY_CANARY}))


@needs_wandb
def test_summarize_run_adds_the_receipt_from_a_subprocess(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"state": "done", "spend_usd": 2.5}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_RUN_ID": "sub-run-1"}
    lines: list[str] = []
    summarize_run(python=sys.executable, output_dir=tmp_path / "out", files=[receipt], env=env,
                  log=lines.append)
    [record_log] = offline_runs(tmp_path / "out")  # the subprocess exited: the file is complete
    data = read_run(record_log)
    assert data["run"]["id"] == "sub-run-1" and data["summary"]["receipt/spend_usd"] == 2.5
    summarize_run(python=str(tmp_path / "no-python"), output_dir=tmp_path, files=[receipt],
                  env=env, log=lines.append)
    assert "failed" in lines[-1]


@needs_wandb
def test_the_agent_runs_tiny_with_wandb_and_adds_the_receipt(tmp_path: Path,
                                                             small_dataset: Path) -> None:
    from remote.status import read_status
    from tests.test_runner import run_agent, tiny_spec, write_plan

    spec = tiny_spec(small_dataset, steps=8)
    spec["wandb"] = {"enabled": True, "project": "agent-test"}
    plan = write_plan(tmp_path, spec, small_dataset)
    run_dir = plan.parent
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    runs = [read_run(p) for p in offline_runs(run_dir / "output")]
    assert {r["run"]["id"] for r in runs} == {"r1"}  # the flux-remote run id, twice
    assert {r["run"]["project"] for r in runs} == {"agent-test"}
    assert sorted(row["_step"] for row in runs[0]["history"] if "train/loss" in row) == list(
        range(1, 9))
    summary = {key: value for r in runs for key, value in r["summary"].items()}
    assert summary["quality/passed"] is True and summary["receipt/state"] == "done"
    assert summary["receipt/steps_done"] == 8
    assert read_status(run_dir)["state"] == "done"
    assert "wandb_url" not in read_status(run_dir)  # offline: no URL


def fake_python(folder: Path, *, pip_fails: bool = False) -> Path:
    """A "python" that imports nothing and records its arguments (pip fails when asked)."""
    script = folder / "fake-python"
    script.write_text("#!/bin/sh\n"
                      f'echo "$*" >> "{folder}/calls"\n'
                      'case "$*" in "-c import "*) exit 1;; esac\n'
                      f"exit {1 if pip_fails else 0}\n", encoding="utf-8")
    script.chmod(0o755)
    return script


def test_bootstrap_installs_wandb_where_the_trainer_lacks_it(tmp_path: Path) -> None:
    from remote.bootstrap import install_extras

    python = str(fake_python(tmp_path))
    lines: list[str] = []
    spec = {"wandb": {"enabled": True}, "captioning": {"mode": "template"}}
    assert install_extras(spec, python, env=dict(os.environ), log=lines.append) == ["wandb"]
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-c import wandb", "-m pip install --quiet wandb"]
    assert install_extras({"wandb": {"enabled": False}}, python, env={}, log=lines.append) == []
    assert install_extras(spec, sys.executable, env=dict(os.environ), log=lines.append) == []


def test_a_failed_wandb_install_is_only_a_warning(tmp_path: Path) -> None:
    from remote.bootstrap import install_extras

    lines: list[str] = []
    python = str(fake_python(tmp_path, pip_fails=True))
    assert install_extras({"wandb": {"enabled": True}}, python, env=dict(os.environ),
                          log=lines.append) == []
    assert any(line.startswith("warning: installing wandb failed") for line in lines)


def test_the_controller_shows_the_run_url_once() -> None:
    import io

    from rich.console import Console

    from controller.run.follow import Snapshot
    from controller.ui import LiveView, status_panel

    out = io.StringIO()
    view = LiveView(Console(file=out, width=100))
    url = "https://wandb.ai/me/loras/runs/r1"
    for step in (1, 2):
        view.update(Snapshot(run_id="r1", stage="train", step=step, total=8,
                             status={"wandb_url": url}))
    assert out.getvalue().count(url) == 1
    panel = io.StringIO()
    Console(file=panel, width=100).print(status_panel(Snapshot(run_id="r1",
                                                               status={"wandb_url": url})))
    assert "W&B" in panel.getvalue() and url in panel.getvalue()
