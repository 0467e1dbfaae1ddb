"""The run commands against a journaled ``local`` run whose run dir is prepared by the test."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from controller.journal import open_journal
from controller.spec.loader import load_spec
from tests.test_launch_local import invoke, write_spec


def make_run(tmp_path: Path, *, state: str = "running", agent: str = "done",
             run_id: str = "c1-20261129-180000-abcd") -> tuple[str, Path]:
    """A run as a controller that died would leave it: journaled, its agent's files on disk."""
    spec = load_spec(write_spec(tmp_path, name="c1"))
    run_dir = tmp_path / "root" / run_id
    (run_dir / "publish").mkdir(parents=True)
    lora = b"lora-bytes"
    (run_dir / "publish" / "c1.safetensors").write_bytes(lora)
    (run_dir / "publish" / "SHA256SUMS").write_text(
        f"{hashlib.sha256(lora).hexdigest()}  c1.safetensors\n")
    (run_dir / "agent.log").write_text("line 1\nline 2\nline 3\n")
    (run_dir / "status.json").write_text(json.dumps(
        {"state": agent, "stage": "publish", "step": 8, "total": 8, "loss": 0.25,
         "stages": {"train": {"ended_at": time.time()}}}))
    (run_dir / "agent.rc").write_text("0\n")
    journal = open_journal()
    journal.create_run(run_id=run_id, name="c1", provider="local", state=state,
                       spec=spec.model_dump(mode="json"), out_dir=str(tmp_path / "out"),
                       budget_usd=1.0, est_usd=0.0)
    journal.update_run(run_id, remote_run_dir=str(run_dir))
    row = journal.instance_intent(run_id, provider="local", label="localhost")
    journal.instance_created(row, "localhost")
    return run_id, run_dir


def test_status_polls_a_running_run(tmp_path: Path) -> None:
    run_id, run_dir = make_run(tmp_path)
    result = invoke("status", run_id[:6], "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)["run"]
    assert run["step"] == 8 and run["loss"] == 0.25 and run["instance_state"] == "live"
    assert "spec_json" not in run
    assert (run_dir / "heartbeat").exists()
    text = invoke("status").output
    assert run_id in text and "8/8" in text


def test_ls_cost_and_logs(tmp_path: Path) -> None:
    run_id, _ = make_run(tmp_path)
    runs = json.loads(invoke("ls", "--json").output)["runs"]
    assert [r["run_id"] for r in runs] == [run_id]
    assert run_id in invoke("ls").output
    cost = json.loads(invoke("cost", run_id, "--json").output)
    assert cost["runs"][0]["est_usd"] == 0.0
    assert invoke("logs", run_id, "--tail", "2").output.splitlines() == ["line 2", "line 3"]
    assert json.loads(invoke("logs", run_id, "--json").output)["lines"][0] == "line 1"


def test_fetch_then_down(tmp_path: Path) -> None:
    run_id, _ = make_run(tmp_path)
    result = invoke("fetch", run_id, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files_verified"] == 1
    assert (tmp_path / "out" / "c1.safetensors").read_bytes() == b"lora-bytes"
    result = invoke("down", run_id, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "stopped"
    assert open_journal().current_instance(run_id) is None
    # logs now come from the fetched copy
    assert "line 3" in invoke("logs", run_id).output


def test_stop_finishes_the_run(tmp_path: Path) -> None:
    run_id, run_dir = make_run(tmp_path, agent="stopped")
    result = invoke("stop", run_id, "--json", "--poll-interval", "0.01")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "stopped"
    assert (run_dir / "STOP").exists()
    assert (tmp_path / "out" / "controller_receipt.json").exists()


def test_resume_of_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    run_id, _ = make_run(tmp_path, state="done")
    result = invoke("resume", run_id, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["state"] == "done"


def test_a_run_the_budget_ends_exits_3_and_shows_budget(tmp_path: Path) -> None:
    """The agent's cost guard stopped training (remote/stages/training.py writes its reason into
    ``stages.train.detail.stop_reason``): the run ends ``budget``, the CLI exits 3 (README: "3
    refused or ended by the budget"), ``status`` shows it, ``resume`` and ``down`` need no
    --force."""
    run_id, run_dir = make_run(tmp_path, agent="stopped")
    status = json.loads((run_dir / "status.json").read_text())
    status["stages"]["train"]["detail"] = {"stop_reason": "cost guard: cap reached"}
    (run_dir / "status.json").write_text(json.dumps(status))
    result = invoke("resume", run_id, "--json", "--poll-interval", "0.01")
    assert result.exit_code == 3, result.output
    ended = json.loads(result.output)
    assert ended["state"] == "budget" and ended["bundle"] and not ended["ok"]
    assert json.loads(invoke("status", run_id, "--json").output)["run"]["state"] == "budget"
    assert invoke("resume", run_id, "--json").exit_code == 3  # still ended by the budget
    down = invoke("down", run_id, "--json")
    assert down.exit_code == 0 and json.loads(down.output)["state"] == "budget", down.output


@pytest.mark.parametrize("ref, message", [("nope", "no run"), ("c1-2026", "matches 2 runs")])
def test_unknown_or_ambiguous_run_is_bad_input(tmp_path: Path, ref: str, message: str) -> None:
    make_run(tmp_path)
    make_run(tmp_path / "b", run_id="c1-20261129-190000-ef01")
    result = invoke("status", ref, "--json")
    assert result.exit_code == 2
    assert message in json.loads(result.output)["message"]


def test_a_locked_run_is_not_driven_twice(tmp_path: Path) -> None:
    from controller.run.states import run_lock

    run_id, _ = make_run(tmp_path)
    with run_lock(open_journal(), run_id):
        result = invoke("resume", run_id, "--json")
    assert result.exit_code == 1
    assert "another flux-remote process" in json.loads(result.output)["message"]


def test_logs_follow_ends_with_the_agent(tmp_path: Path) -> None:
    run_id, run_dir = make_run(tmp_path)
    result = invoke("logs", run_id, "--follow", "--tail", "1", "--poll-interval", "0.01")
    assert result.exit_code == 0
    assert result.output.splitlines() == ["line 3"]


class _Interrupting:
    """Stands in for the Orchestrator: the first drive is interrupted by Ctrl-C."""

    def __init__(self, state: str = "running") -> None:
        self.reporter = None
        self.calls: list[str] = []
        self._state = state

    def drive(self, run_id, options, estimate=None):
        self.calls.append("drive")
        if self.calls.count("drive") == 1:
            raise KeyboardInterrupt
        return "finished"

    def outcome(self, run_id, *, detached=False):
        self.calls.append("detach")
        return "detached"

    def state(self, run_id):
        return self._state

    def request_stop(self, run_id):
        self.calls.append("stop")

    def down(self, run_id, *, force=False):
        self.calls.append("down")
        return "down"


def test_ctrl_c_with_yes_detaches_but_never_leaves_an_idle_machine() -> None:
    from controller.cli.run_cmds import _drive_interactive
    from controller.run.orchestrator import Options

    orch = _Interrupting()
    assert _drive_interactive(orch, "r", Options(), yes=True) == "detached"
    assert "stop" not in orch.calls
    orch = _Interrupting("booting")  # rented, nothing running on it yet
    assert _drive_interactive(orch, "r", Options(), yes=True) == "down"


@pytest.mark.parametrize("answer, state, expected, calls", [
    ("s", "running", "finished", ["drive", "stop", "drive"]),
    ("d", "running", "detached", ["drive", "detach"]),
    ("s", "shipping", "down", ["drive", "down"]),
])
def test_ctrl_c_asks_stop_or_detach(monkeypatch: pytest.MonkeyPatch, answer: str, state: str,
                                    expected: str, calls: list[str]) -> None:
    import typer

    from controller.cli.run_cmds import _drive_interactive
    from controller.run.orchestrator import Options

    monkeypatch.setattr(typer, "prompt", lambda *a, **k: answer)
    orch = _Interrupting(state)
    assert _drive_interactive(orch, "r", Options(), yes=False) == expected
    assert orch.calls == calls


def test_fetch_after_the_machine_is_gone_is_a_clear_error(tmp_path: Path) -> None:
    run_id, _ = make_run(tmp_path)
    assert invoke("down", run_id, "--force").exit_code == 0
    result = invoke("fetch", run_id, "--json")
    assert result.exit_code == 1
    assert "no longer holds its machine" in json.loads(result.output)["message"]
    assert open_journal().current_instance(run_id) is None  # nothing was re-claimed
