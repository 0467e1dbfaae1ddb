"""Agent-side faults and the budget, at the orchestrator level.

Covered elsewhere and listed in docs/reliability.md: a trainer crash is retried from the
checkpoint (tests/test_train_supervision.py::test_crash_is_retried_from_the_checkpoint,
tests/test_runner.py::test_killed_mid_training_resumes_from_its_checkpoint), STOP during a save
lets the save finish (test_train_supervision.py::test_stop_during_a_save_never_interrupts_it),
the agent's own cost guard (test_runner.py::test_cost_guard_stops_training_and_packs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.errors import RunError
from controller.orchestrator import Options
from tests.faults import record
from tests.test_resume_gc import ScriptedHost, ScriptedProvider, _orchestrate


def test_a_run_much_slower_than_planned_is_stopped_before_the_cap(tmp_path: Path) -> None:
    host = ScriptedHost()
    # the agent crawls: 40 s/step where the plan said ~1; it never finishes on its own
    host.on_start = lambda h, run_dir: h.files.update({
        f"{run_dir}/status.json": json.dumps({"state": "running", "stage": "train", "step": 1,
                                              "total": 1000, "s_per_step": 40.0}).encode()})

    def on_write(h: ScriptedHost, path: str) -> None:
        if path.endswith("/STOP"):
            h.finish(path.rsplit("/", 1)[0], "stopped")

    host.on_write = on_write
    provider = ScriptedProvider(host, price=100.0, started_ago=30.0)
    orch, run_id = _orchestrate(tmp_path, provider)
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "stopped" and outcome.bundle
    receipt = outcome.receipt or {}
    budget = orch.journal.get_run(run_id)["budget_usd"]
    assert receipt["metered_usd"] <= budget
    assert "cap_stop" in [e["kind"] for e in orch.journal.events(run_id)]
    record("budget:slow-run-capped", overruns=int(receipt["metered_usd"] > budget))


def test_a_full_disk_fails_clearly_and_leaves_no_corrupt_bundle(tmp_path: Path) -> None:
    host = ScriptedHost()

    def disk_full(h: ScriptedHost, run_dir: str) -> None:
        # what the agent leaves when publish hits ENOSPC: a half-written file, no SHA256SUMS
        h.files[f"{run_dir}/publish/x.safetensors"] = b"half"
        h.files[f"{run_dir}/status.json"] = json.dumps({
            "state": "failed", "stage": "publish", "cause": "disk_full",
            "error": "no space left on the instance's disk while packing the bundle"}).encode()
        h.files[f"{run_dir}/agent.rc"] = b"1\n"
        h.alive.clear()

    host.on_start = disk_full
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "failed" and "no space left" in (outcome.error or "")
    assert "disk_full" in (outcome.error or "")
    out = Path(orch.journal.get_run(run_id)["out_dir"])
    assert not (out / "SHA256SUMS").exists() and not (out / "x.safetensors").exists()
    assert (out / "logs" / "status.json").exists()  # the explanation came home
    assert provider.released == [False]  # nothing to keep: the machine is let go
    record("agent:disk-full", lost=0)


def test_an_unverifiable_bundle_is_kept_on_a_stopped_instance(tmp_path: Path) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.finish(run_dir, "done", good_sums=False)
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    with pytest.raises(RunError, match=f"flux-remote fetch {run_id}"):
        orch.drive(run_id, Options(poll_interval=0))
    assert provider.released == [True]  # stopped, data kept: the artifact is not lost
    record("agent:corrupt-bundle-kept", lost=0)
