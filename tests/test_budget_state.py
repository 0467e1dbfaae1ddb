"""A run the budget ends is ``budget``: the agent's own cost guard (or its watchdog) stopping
training ends it so, a stop the user asked for stays ``stopped``, and a batch counts a ``budget``
run as ended (never retried as an infrastructure failure). The controller's cap, a STOP ignored
and no offer within the money left are proved in test_stop_request.py, test_faults_hostile.py and
test_relaunch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.batch.scheduler import BatchScheduler
from controller.batch.setup import create_batch
from controller.journal import open_journal
from controller.run.fetch import train_stop_reason
from controller.run.orchestrator import Options
from controller.run.states import BUDGET, STOPPED, TERMINAL_STATES, stopped_state
from controller.spec.loader import load_file
from tests.test_batch_scheduler import FAST, batch_file
from tests.test_launch_local import write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider, _orchestrate


def finish_stopped(host: ScriptedHost, run_dir: str, stop_reason: str | None) -> None:
    """The agent ended ``stopped`` with a verified bundle; ``stop_reason`` as
    remote/stages/training.py ``train`` writes it into ``stages.train.detail``."""
    host.finish(run_dir, "stopped")
    status = json.loads(host.files[f"{run_dir}/status.json"])
    status["stages"]["train"]["detail"] = {"state": "stopped", "stop_reason": stop_reason}
    host.files[f"{run_dir}/status.json"] = json.dumps(status).encode()


@pytest.mark.parametrize("reason, state", [
    ("cost guard: cap reached", BUDGET),  # remote/runner.py stop_now
    ("cost guard: max_hours 2 reached (2.01 h)", BUDGET),  # remote/costguard.py _reason
    ("watchdog: cap reached and the controller is silent", BUDGET),  # remote/watchdog.py
    ("stop requested by the user", STOPPED),  # controller.run.orchestrator.request_stop
    (None, STOPPED),
])
def test_the_agents_own_cost_guard_ends_the_run_budget(tmp_path: Path, reason: str | None,
                                                       state: str) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: finish_stopped(h, run_dir, reason)
    orch, run_id = _orchestrate(tmp_path, ScriptedProvider(host))
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == state and outcome.bundle  # the bundle came home verified either way
    assert orch.journal.current_instance(run_id) is None  # and the machine is gone


def test_budget_is_a_terminal_state_and_the_cap_makes_it() -> None:
    assert BUDGET in TERMINAL_STATES
    assert stopped_state(cap_stopped=True, stop_reason="anything") == BUDGET
    assert stopped_state(cap_stopped=False, stop_reason="cost guard: cap reached") == BUDGET
    assert stopped_state(cap_stopped=False, stop_reason="a cost guard said so") == STOPPED


@pytest.mark.parametrize("status", [{}, {"stages": []}, {"stages": {"train": "x"}},
                                    {"stages": {"train": {"detail": [1]}}},
                                    {"stages": {"train": {"detail": {"stop_reason": None}}}}])
def test_a_stop_reason_the_instance_garbled_is_none(status: dict) -> None:
    assert train_stop_reason(status) is None  # the run then ends `stopped`, never a traceback


def test_a_stop_reason_is_plain_text() -> None:
    reason = "cost guard: \x1b[2Jcap" + "x" * 500
    found = train_stop_reason({"stages": {"train": {"detail": {"stop_reason": reason}}}})
    assert found is not None and found.startswith("cost guard: ")
    assert "\x1b" not in found and len(found) <= 81  # 80 characters and an ellipsis


def test_a_batch_counts_a_run_the_budget_ended_as_finished(tmp_path: Path) -> None:
    host = ScriptedHost()

    def on_start(h: ScriptedHost, run_dir: str) -> None:
        if "bc-cap" in run_dir:
            finish_stopped(h, run_dir, "cost guard: cap reached")
        else:
            h.finish(run_dir, "done")

    host.on_start = on_start
    spec = write_spec(tmp_path, name="bc", steps=4, budget=0.5)
    path = batch_file(spec, {"max_usd": 2.0, "max_parallel": 1, "retries": 1,
                             "runs": [{"name": "bc-ok"}, {"name": "bc-cap"}]})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")
    result = BatchScheduler(journal, batch_id, options=FAST,
                            provider_factory=lambda name, claims: ScriptedProvider(host)).run()

    slots = {row["name"]: row for row in result.rows}
    assert slots["bc-ok"]["slot_state"] == "done", json.dumps(result.rows, default=str)[:3000]
    assert slots["bc-cap"]["slot_state"] == "budget" and slots["bc-cap"]["attempts"] == 1
    assert result.state == "partial"
    [run] = [r for r in journal.runs_of_batch(batch_id) if r["name"] == "bc-cap"]
    assert run["state"] == "budget" and run["bundle_path"]
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert {r["name"]: r["result"] for r in summary["runs"]}["bc-cap"] == "budget"
