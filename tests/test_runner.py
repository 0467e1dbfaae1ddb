"""The whole agent pipeline, for real: ``python -m remote run plan.json`` with the tiny trainer on
12 small images, and once with a local git repository standing in for ai-toolkit.

Covers: the bundle and its SHA256SUMS, a second run that only reports done, a run killed
mid-training that continues its step count, STOP honoured, a trainer crash reported with its
cause, the single-instance lock, secrets redacted from agent.log, bad plans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import HTTPServer
from pathlib import Path

import pytest

from controller.spec.model import RunSpec
from remote.checks import Probes
from remote.plan import load_plan, make_plan, write_json_atomic
from remote.publish.bundle import verify_sha256sums
from remote.runner import RunLock, Runner, run_plan, trainer_pids
from remote.secrets import Redactor, load_secrets, parse_env_file
from remote.status import STAGES, AgentLog, read_events, read_status
from tests.test_bootstrap import aitk_env, make_fake_aitk
from tests.test_costguard_watchdog import FakeVastHandler

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
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
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
    loss_lines = (run_dir / "work" / "loss.jsonl").read_text().splitlines()
    losses = [json.loads(line) for line in loss_lines]
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

    shutil.rmtree(publish)  # a lost bundle is packed again; nothing else runs
    seen = len(read_events(run_dir))
    assert run_agent(plan) == 0
    assert verify_sha256sums(publish) == []
    assert [e["stage"] for e in read_events(run_dir)[seen:] if e["event"] == "stage_start"] == [
        "publish"]


def test_killed_mid_training_resumes_from_its_checkpoint(tmp_path: Path,
                                                         small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=64), small_dataset)
    run_dir = plan.parent
    proc = agent(plan, {"FLUX_REMOTE_TINY_STEP_DELAY": "0.1"})
    try:
        wait_for(lambda: "checkpoint" in kinds(run_dir) and (read_status(run_dir) or {}).get(
            "step", 0) and read_status(run_dir)["step"] >= 10, what="a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: agent and trainer
        proc.wait()
    killed_at = read_status(run_dir)
    assert killed_at["state"] == "running" and killed_at["stage"] == "train"
    checkpoint_step = max(e["step"] for e in read_events(run_dir) if e["event"] == "checkpoint")
    # the trainer runs in a session of its own: it outlives the agent until its next write fails,
    # and the new agent waits for it before training again
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    assert not trainer_pids(run_dir / "work" / "config.yaml")
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 64
    log = (run_dir / "agent.log").read_text()
    second = log[log.rindex("resuming run r1"):]
    first_step = int(second.split("/64 [")[0].rsplit("| ", 1)[-1].strip())
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


def test_gate_failure_stops_before_training(tmp_path: Path, small_dataset: Path) -> None:
    spec = tiny_spec(small_dataset)
    spec["quality_gate"]["min_images"] = 50
    plan = write_plan(tmp_path, spec, small_dataset)
    run_dir = plan.parent
    assert run_agent(plan) == 1
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["cause"] == "quality_gate"
    assert "quality gate FAILED" in status["error"]
    assert status["stages"]["train"]["state"] == "pending"
    assert (run_dir / "work" / "quality_report.json").is_file()


def test_secrets_reach_the_trainer_and_are_redacted_everywhere(tmp_path: Path,
                                                               small_dataset: Path) -> None:
    leak = ("import os, sys; print('token is', os.environ['HF_TOKEN'], flush=True); "
            "sys.exit(3)")
    spec = tiny_spec(small_dataset, command=[sys.executable, "-c", leak])
    secrets = tmp_path / "secrets.env"
    secrets.write_text("export HF_TOKEN='hf_supersecretvalue123'\n")
    secrets.chmod(0o600)
    plan = write_plan(tmp_path, spec, small_dataset, secrets_file=str(secrets))
    run_dir = plan.parent
    assert run_agent(plan) == 1
    assert "token is ***" in (run_dir / "agent.log").read_text()
    assert "token is ***" in read_status(run_dir)["error"]
    for name in ("agent.log", "events.jsonl", "status.json"):
        assert "hf_supersecretvalue123" not in (run_dir / name).read_text(), name
    assert "hf_supersecretvalue123" not in json.dumps(load_plan(plan))


def test_redaction_in_the_agent_log(tmp_path: Path) -> None:
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
    env = {**aitk_env(AITK_STANDIN_RECORD=str(record)), "PYTHONPATH": str(ROOT)}
    # a CPU-only box cannot pass ai-toolkit's GPU checks: describe a GPU machine to the runner
    probes = Probes(run=lambda argv: ("RTX 4090, 24564, 24000, 580.65\n" if "--query-gpu" in
                                      " ".join(argv) else ("CUDA Version: 13.0" if argv == [
                                          "nvidia-smi"] else "")),
                    disk_free=lambda p: 500 * 1024 ** 3, torch_info=lambda: None,
                    read={"/proc/meminfo": "MemTotal: 67108864 kB\n"}.get)
    runner = Runner(load_plan(plan), env=env, probes=probes, image_checkouts=())
    assert runner.run() == 0, (run_dir / "agent.log").read_text()[-3000:]
    runner.log.close()
    launched = json.loads(record.read_text())
    checkout = tmp_path / "runs" / "cache" / "ai-toolkit" / commit
    assert launched["argv"] == ["run.py", str(run_dir / "work" / "config.yaml")]
    assert Path(launched["cwd"]) == checkout
    assert launched["python"] == str(checkout / "venv" / "bin" / "python")
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 12
    assert status["stages"]["bootstrap"]["detail"]["source"] == "built"
    assert verify_sha256sums(run_dir / "publish") == []
    # a second plan on the same instance reuses the install
    plan2 = make_plan(run_id="r2", spec=spec, run_dir=str(tmp_path / "runs" / "r2"),
                      dataset_dir=str(small_dataset), provider="local")
    runner2 = Runner(plan2, env=env, probes=probes, image_checkouts=())
    assert runner2.run() == 0
    runner2.log.close()
    reused = read_status(tmp_path / "runs" / "r2")["stages"]["bootstrap"]["detail"]
    assert reused["source"] == "cached"


def test_cost_guard_stops_training_and_packs(tmp_path: Path, small_dataset: Path) -> None:
    # $36/h with $4.00 already spent of $5: the reserve for publishing alone ($1.20) crosses the
    # cap, and the cap itself is still 100 s away, however slowly a loaded machine gets to training
    spec = tiny_spec(small_dataset, steps=200)
    plan_path = write_plan(tmp_path, spec, small_dataset, billing_started_at=time.time() - 400)
    plan = json.loads(plan_path.read_text())
    plan["price_per_hour"] = 36.0
    write_json_atomic(plan_path, plan)
    run_dir = plan_path.parent
    assert run_agent(plan_path, {"FLUX_REMOTE_TINY_STEP_DELAY": "0.05"}) == 0, \
        (run_dir / "agent.log").read_text()[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "stopped" and status["spend_usd"] >= 4.0
    assert status["stages"]["train"]["detail"]["stop_reason"].startswith("cost guard")
    guard = [e for e in read_events(run_dir) if e["event"] == "costguard"]
    assert guard and "over the $5.00 budget" in guard[0]["reason"]
    assert status["stages"]["train"]["detail"]["step"] < 200
    assert verify_sha256sums(run_dir / "publish") == []


def test_status_command(tmp_path: Path, small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=8), small_dataset)
    assert run_agent(plan) == 0
    human = subprocess.run([sys.executable, "-m", "remote", "status", str(plan.parent)], cwd=ROOT,
                           capture_output=True, text=True)
    assert human.returncode == 0
    assert "run r1: done" in human.stdout and "step 8/8" in human.stdout
    assert "train" in human.stdout and "publish" in human.stdout
    as_json = subprocess.run([sys.executable, "-m", "remote", "status", "--json",
                              str(plan.parent)], cwd=ROOT, capture_output=True, text=True)
    assert json.loads(as_json.stdout)["state"] == "done"
    missing = subprocess.run([sys.executable, "-m", "remote", "status", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no status.json" in missing.stderr


def test_on_vast_the_finished_agent_stops_its_instance_when_the_laptop_is_silent(
        tmp_path: Path, small_dataset: Path) -> None:
    FakeVastHandler.requests = []
    FakeVastHandler.status_code = 200
    server = HTTPServer(("127.0.0.1", 0), FakeVastHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=8), small_dataset)
        data = load_plan(plan)
        data["heartbeat_grace_s"] = 1  # the spec's minimum is 10 s: too slow for a test
        write_json_atomic(plan, data)
        env = {"CONTAINER_ID": "99", "CONTAINER_API_KEY": "instance-key-abc",
               "VAST_URL": f"http://127.0.0.1:{server.server_port}"}
        began = time.monotonic()
        assert run_agent(plan, env) == 0  # the agent exits: the controller fetches on that
        assert time.monotonic() - began < 120  # it did not wait out the watchdog's grace
        wait_for(lambda: FakeVastHandler.requests, timeout=60, what="the self-stop request")
    finally:
        server.shutdown()
        server.server_close()
    assert FakeVastHandler.requests == [{"path": "/api/v0/instances/99/",
                                         "auth": "Bearer instance-key-abc",
                                         "body": {"state": "stopped"}}]
    watchdog = [e for e in read_events(plan.parent) if e["event"] == "watchdog"]
    assert watchdog[0]["action"] == "hand_over"
    wait_for(lambda: any(e["event"] == "watchdog" and e["action"] == "stop_instance"
                         for e in read_events(plan.parent)), timeout=60, what="the event")
    assert "instance-key-abc" not in (plan.parent / "agent.log").read_text()


def test_the_watcher_leaves_when_a_new_agent_takes_over(tmp_path: Path) -> None:
    from remote.watchdog import linger

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json_atomic(run_dir / "status.json", {"state": "running"})
    plan = {"run_dir": str(run_dir), "heartbeat_grace_s": 1}
    env = {"CONTAINER_ID": "1", "CONTAINER_API_KEY": "k" * 10, "VAST_URL": "http://127.0.0.1:9"}
    assert linger(plan, env=env, sleep=lambda s: None, max_s=5) is False
    assert not (run_dir / "events.jsonl").exists()


def test_stop_before_training_ends_stopped_without_a_bundle(tmp_path: Path,
                                                            small_dataset: Path) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset), small_dataset)
    (plan.parent / "STOP").touch()
    runner = Runner(load_plan(plan), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert runner.run() == 1
    runner.log.close()
    status = read_status(plan.parent)
    assert status["state"] == "stopped" and status["cause"] == "stopped"
    assert status["stages"]["checks"]["state"] == "skipped"
    assert not (plan.parent / "publish").exists()


def test_trainer_pids_reads_command_lines(tmp_path: Path) -> None:
    for pid, argv in (("101", [b"python", b"-m", b"remote.trainers.tiny", b"/r/work/config.yaml"]),
                      ("102", [b"python", b"run.py", b"/other/config.yaml"]), ("self", [b"x"])):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    assert trainer_pids(Path("/r/work/config.yaml"), tmp_path) == [101]


def test_secrets_file_parsing_and_mode(tmp_path: Path) -> None:
    assert parse_env_file("# c\nexport HF_TOKEN=\"a b\"\nWANDB_API_KEY='x'\nBAD\n=v\n") == {
        "HF_TOKEN": "a b", "WANDB_API_KEY": "x"}
    path = tmp_path / "s.env"
    path.write_text("HF_TOKEN=hf_abcdefgh\n")
    path.chmod(0o644)
    values, warnings = load_secrets(path)
    assert values == {"HF_TOKEN": "hf_abcdefgh"} and "should be 600" in warnings[0]
    path.chmod(0o600)
    assert load_secrets(path) == ({"HF_TOKEN": "hf_abcdefgh"}, [])
    assert load_secrets(None) == ({}, [])
    assert "does not exist" in load_secrets(tmp_path / "none")[1][0]


def test_outputs_follow_the_chosen_volume(tmp_path: Path, small_dataset: Path) -> None:
    volume = tmp_path / "bigdisk"
    volume.mkdir()
    plan = write_plan(tmp_path, tiny_spec(small_dataset, steps=8), small_dataset)
    data = load_plan(plan)
    data["provider"] = "vast"
    sizes = {str(volume): 900, str(plan.parent.parent): 50}
    probes = Probes(run=lambda argv: None, read={
        "/proc/mounts": f"/dev/nvme1n1 {volume} ext4 rw 0 0\n",
        "/proc/meminfo": "MemTotal: 16777216 kB\n"}.get,
        disk_free=lambda p: sizes.get(p, 100) * 1024 ** 3,
        writable=lambda p: p in sizes, same_device=lambda a, b: False)
    # On Vast the checks stage requires the container variables (here as if in PID 1's env).
    vast_env = {"CONTAINER_ID": "1", "CONTAINER_API_KEY": "container-key-1"}
    runner = Runner(data, env={**os.environ, "PYTHONPATH": str(ROOT), **vast_env}, probes=probes)
    assert runner.run() == 0, (plan.parent / "agent.log").read_text()[-3000:]
    runner.log.close()
    target = volume / "flux-remote-cache" / "outputs" / "r1"
    assert (plan.parent / "output").resolve() == target
    assert (target / "demo_lora" / "demo_lora.safetensors").is_file()
    checks = read_status(plan.parent)["stages"]["checks"]["detail"]
    assert checks["outputs"] == str(target) and checks["mount_choice"]["origin"] == "mount"
    assert verify_sha256sums(plan.parent / "publish") == []


def test_a_failed_status_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    write_json_atomic(target, {"state": "running"})
    loop: dict = {}
    loop["self"] = loop  # json.dump fails half-way through, as a full disk would
    with pytest.raises(ValueError):
        write_json_atomic(target, {"state": "done", "loop": loop})
    assert json.loads(target.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
