"""The whole agent pipeline, for real: ``python -m remote run plan.json`` with the tiny trainer on
12 small images, and once with a local git repository standing in for ai-toolkit.

Covers: the bundle and its SHA256SUMS, a second run that only reports done, a run killed
mid-training that continues its step count, STOP honoured, a trainer crash reported with its
cause, the single-instance lock, secrets redacted from agent.log, bad plans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.spec import RunSpec
from remote.plan import make_plan, write_json_atomic
from remote.publish.bundle import verify_sha256sums
from remote.runner import RunLock, run_plan
from remote.status import STAGES, read_events, read_status
from tests.test_bootstrap import aitk_env, make_fake_aitk

ROOT = Path(__file__).resolve().parent.parent


def tiny_spec(dataset: Path, *, steps: int = 24, **training) -> dict:
    spec = RunSpec.model_validate({
        "name": "demo_lora", "trigger_word": "p3r5on",
        "dataset": {"path": str(dataset)},
        "quality_gate": {"min_short_side": 64},
        "training": {"trainer": "tiny", "steps": steps, "rank": 4, "lr": 1e-3,
                     "resolutions": [32], "save_every": 8, "max_retries": 0,
                     "sample": {"every": 8, "prompts": ["[trigger] portrait", "[trigger] cafe"],
                                "steps": 2, "width": 64, "height": 64}, **training},
        "budget": {"max_usd": 5.0},
        "provider": "local",
    })
    return spec.model_dump(mode="json")


def write_plan(tmp_path: Path, spec: dict, dataset: Path, **extra) -> Path:
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(run_id="r1", spec=spec, run_dir=str(run_dir), dataset_dir=str(dataset),
                     provider="local", price_per_hour=0.0, **extra)
    path = run_dir / "plan.json"
    write_json_atomic(path, plan)
    return path


def agent(plan: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """The agent as the controller starts it: its own session, output to a file."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = open(plan.parent / "agent.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "remote", "run", str(plan)], cwd=ROOT,
                            env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, **popen)


def run_agent(plan: Path, env: dict | None = None, timeout: float = 90) -> int:
    proc = agent(plan, env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kinds(run_dir: Path) -> list[str]:
    return [e["event"] for e in read_events(run_dir)]


def test_whole_pipeline_then_a_second_run_is_a_no_op(tmp_path: Path, small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset), small_dataset)
    run_dir = plan.parent
    began = time.monotonic()
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    assert time.monotonic() - began < 60
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 24 and status["total"] == 24
    assert [status["stages"][s]["state"] for s in STAGES] == ["done"] * len(STAGES)
    assert status["stages"]["checks"]["detail"]["checks"]
    publish = run_dir / "publish"
    assert verify_sha256sums(publish) == []
    done = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=publish)
    assert done.returncode == 0
    names = {p.relative_to(publish).as_posix() for p in publish.rglob("*") if p.is_file()}
    assert {"demo_lora.safetensors", "config.yaml", "run.yaml", "quality_report.json",
            "README.md", "receipt.json", "report.html", "SHA256SUMS"} <= names
    assert len([n for n in names if n.startswith("captions/")]) == 12
    assert any(n.startswith("samples/") for n in names)
    receipt = json.loads((publish / "receipt.json").read_text())
    assert receipt["state"] == "done" and receipt["steps"]["done"] == 24
    assert receipt["s_per_step"] and receipt["durations_s"]["train"] > 0
    report = (publish / "report.html").read_text()
    assert "<svg" in report and "data:image/jpeg;base64," in report
    losses = [json.loads(line) for line in (run_dir / "work" / "loss.jsonl").read_text().splitlines()]
    assert losses[-1]["step"] == 24
    events = kinds(run_dir)
    assert events.count("stage_start") == len(STAGES) and "checkpoint" in events
    assert "quality_gate" in events and events[-1] == "run_end"
    assert "Saved checkpoint to" in (run_dir / "agent.log").read_text()

    sums_before = (publish / "SHA256SUMS").read_bytes()
    assert run_agent(plan) == 0
    assert kinds(run_dir)[-1] == "already_finished"
    assert (publish / "SHA256SUMS").read_bytes() == sums_before
    assert "already done; nothing to do" in (run_dir / "agent.log").read_text()


def test_killed_mid_training_resumes_from_its_checkpoint(tmp_path: Path,
                                                         small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=40), small_dataset)
    run_dir = plan.parent
    proc = agent(plan, {"FLUX_REMOTE_TINY_STEP_DELAY": "0.15"})
    try:
        wait_for(lambda: "checkpoint" in kinds(run_dir) and (read_status(run_dir) or {}).get(
            "step", 0) and read_status(run_dir)["step"] >= 10, what="a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: agent and trainer
        proc.wait()
    killed_at = read_status(run_dir)
    assert killed_at["state"] == "running" and killed_at["stage"] == "train"
    checkpoint_step = max(e["step"] for e in read_events(run_dir) if e["event"] == "checkpoint")
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 40
    log = (run_dir / "agent.log").read_text()
    second = log[log.rindex("resuming run r1"):]
    first_step = int(second.split("/40 [")[0].rsplit("| ", 1)[-1].strip())
    assert first_step > checkpoint_step - 1  # it went on from the checkpoint, not from step 1
    starts = [e for e in read_events(run_dir) if e["event"] == "stage_start"]
    assert [e["stage"] for e in starts].count("checks") == 1  # finished stages were skipped
    assert verify_sha256sums(run_dir / "publish") == []


def test_stop_file_is_honoured_and_what_exists_is_published(tmp_path: Path,
                                                            small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=200), small_dataset)
    run_dir = plan.parent
    proc = agent(plan, {"FLUX_REMOTE_TINY_STEP_DELAY": "0.05"})
    try:
        wait_for(lambda: "checkpoint" in kinds(run_dir), what="a checkpoint")
        (run_dir / "STOP").touch()
        assert proc.wait(timeout=60) == 0, (run_dir / "agent.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = read_status(run_dir)
    assert status["state"] == "stopped", status
    assert status["stages"]["train"]["state"] == "stopped"
    assert 8 <= status["stages"]["train"]["detail"]["step"] < 200
    assert "stop_requested" in kinds(run_dir)
    receipt = json.loads((run_dir / "publish" / "receipt.json").read_text())
    assert receipt["state"] == "stopped"
    assert verify_sha256sums(run_dir / "publish") == []
    assert run_agent(plan) == 0 and kinds(run_dir)[-1] == "already_finished"


def test_a_trainer_crash_fails_with_its_cause(tmp_path: Path, small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset), small_dataset)
    run_dir = plan.parent
    assert run_agent(plan, {"FLUX_REMOTE_TINY_CRASH_AT_STEP": "5"}) == 1
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["stage"] == "train"
    assert status["stages"]["train"]["state"] == "failed"
    assert status["cause"] and status["error"].startswith("training failed")
    failed = [e for e in read_events(run_dir) if e["event"] == "train_failed"]
    assert failed and failed[0]["log_tail"]
    assert not (run_dir / "publish").exists()


def test_gate_failure_and_secrets_redacted(tmp_path: Path, small_dataset: Path) -> None:
    spec = tiny_spec(small_dataset)
    spec["quality_gate"]["min_images"] = 50
    secrets = tmp_path / "secrets.env"
    secrets.write_text("HF_TOKEN=hf_supersecretvalue123\n")
    secrets.chmod(0o600)
    plan = write_plan(tmp_path, spec, small_dataset, secrets_file=str(secrets))
    run_dir = plan.parent
    env = {"FLUX_REMOTE_LEAK": "hf_supersecretvalue123"}
    code = run_agent(plan, env)
    assert code == 1
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["cause"] == "quality_gate"
    assert "quality gate FAILED" in status["error"]
    assert status["stages"]["train"]["state"] == "pending"
    assert "hf_supersecretvalue123" not in (run_dir / "agent.log").read_text()


def test_redaction_in_the_agent_log(tmp_path: Path) -> None:
    from remote.runner import AgentLog
    from remote.secrets import Redactor

    log = AgentLog(tmp_path / "agent.log", Redactor(["hf_supersecretvalue123"]))
    log.agent("token is hf_supersecretvalue123")
    log.trainer("progress 1\rprogress 2 token hf_supersec")
    log.trainer("retvalue123 end\n")
    log.close()
    text = (tmp_path / "agent.log").read_text()
    assert "supersec" not in text and text.count("***") == 2


def test_lock_and_bad_plans(tmp_path: Path, capsys) -> None:
    assert run_plan(str(tmp_path / "missing.json")) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    assert run_plan(str(bad)) == 2
    assert "lacks" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    plan = write_plan(tmp_path, {"name": "x", "training": {}}, tmp_path)
    holder = RunLock(run_dir)
    assert holder.acquire() is None
    try:
        assert run_plan(str(plan)) == 1
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.release()


def test_ai_toolkit_path_bootstraps_and_launches_run_py(tmp_path: Path,
                                                         small_dataset: Path) -> None:
    url, commit = make_fake_aitk(tmp_path)
    spec = tiny_spec(small_dataset, steps=12)
    spec["training"]["trainer"] = "ai-toolkit"
    spec["training"]["ai_toolkit"].update(repo=url, commit=commit)
    spec["provider"]["remote_root"] = str(tmp_path / "runs")
    plan = write_plan(tmp_path, spec, small_dataset)
    run_dir = plan.parent
    record = tmp_path / "launch.json"
    env = {**aitk_env(FAKE_AITK_RECORD=str(record)), "PYTHONPATH": str(ROOT)}
    # a CPU-only box cannot pass ai-toolkit's GPU checks: describe a GPU machine to the runner
    from remote.checks import Probes
    from remote.runner import Runner

    probes = Probes(run=lambda argv: ("RTX 4090, 24564, 24000, 580.65\n" if "--query-gpu" in
                                      " ".join(argv) else ("CUDA Version: 13.0" if argv == [
                                          "nvidia-smi"] else "")),
                    disk_free=lambda p: 500 * 1024 ** 3, torch_info=lambda: None,
                    read={"/proc/meminfo": "MemTotal: 67108864 kB\n"}.get)
    from remote.plan import load_plan

    runner = Runner(load_plan(plan), env=env, probes=probes, image_checkouts=())
    assert runner.run() == 0, (run_dir / "agent.log").read_text()[-3000:]
    runner.log.close()
    launched = json.loads(record.read_text())
    checkout = tmp_path / "runs" / "ai-toolkit" / commit
    assert launched["argv"] == ["run.py", str(run_dir / "work" / "config.yaml")]
    assert Path(launched["cwd"]) == checkout
    assert launched["python"] == str(checkout / "venv" / "bin" / "python")
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 12
    assert status["stages"]["bootstrap"]["detail"]["source"] == "built"
    assert verify_sha256sums(run_dir / "publish") == []
    # a second plan on the same instance reuses the install
    second = tmp_path / "second"
    second.mkdir()
    plan2 = make_plan(run_id="r2", spec=spec, run_dir=str(tmp_path / "runs" / "r2"),
                      dataset_dir=str(small_dataset), provider="local")
    runner2 = Runner(plan2, env=env, probes=probes, image_checkouts=())
    (tmp_path / "runs" / "r2").mkdir()
    assert runner2.run() == 0
    runner2.log.close()
    assert read_status(tmp_path / "runs" / "r2")["stages"]["bootstrap"]["detail"]["source"] == "cached"
