"""Agent-side faults and the budget, at the orchestrator level.

Covered elsewhere and listed in docs/reliability.md: a trainer crash is retried from the
checkpoint (tests/test_train_supervision.py::test_crash_is_retried_from_the_checkpoint,
tests/test_runner.py::test_killed_mid_training_resumes_from_its_checkpoint), STOP during a save
lets the save finish (test_train_supervision.py::test_stop_during_a_save_never_interrupts_it),
the agent's own cost guard (test_runner.py::test_cost_guard_stops_training_and_packs).
A full disk on the real agent: tests/test_faults_disk.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.errors import RunError
from controller.run.orchestrator import Options
from remote.dataset.ingest import FAULT_ENV, ingest
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
    assert outcome.state == "budget" and outcome.bundle
    receipt = outcome.receipt or {}
    budget = orch.journal.get_run(run_id)["budget_usd"]
    assert receipt["metered_usd"] <= budget
    assert "cap_stop" in [e["kind"] for e in orch.journal.events(run_id)]
    record("budget:slow-run-capped", receipt=receipt, budget=budget)


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
    record("agent:disk-full")  # no LoRA existed to lose: nothing to observe


def test_an_unverifiable_bundle_is_kept_on_a_stopped_instance(tmp_path: Path) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.finish(run_dir, "done", good_sums=False)
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    with pytest.raises(RunError, match=f"flux-remote fetch {run_id}"):
        orch.drive(run_id, Options(poll_interval=0))
    assert provider.released == [True]  # stopped, data kept: the artifact is not lost
    record("agent:corrupt-bundle-kept", kept=provider.released == [True])


def test_an_ingest_worker_that_dies_costs_only_its_own_file(
        tmp_path: Path, small_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the first file kills whichever pool worker picks it up: the pool breaks while most of the
    # other eleven are still queued, and each of them must be ingested all the same
    monkeypatch.setenv(FAULT_ENV, "exit:img_00.jpg")
    result = ingest(small_dataset, tmp_path / "work", workers=2)
    records = {record.source: record for record in result.images}
    dead = records.pop("img_00.jpg")
    assert dead.path is None and dead.caption_path is None
    assert dead.issues and dead.issues[0].startswith("corrupt: the decoder process died")
    assert len(records) == 11 and all(r.usable and not r.issues for r in records.values())
    produced = sorted(p.name for p in result.dataset_dir.glob("*.jpg"))
    assert produced == sorted(r.path.name for r in records.values() if r.path)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["totals"] == {"files": 12, "ingested": 11, "unusable": 1, "skipped": 0,
                                  "orphan_captions": 0}
    record("agent:ingest-worker-died", lost=11 - len(produced))  # the healthy files on disk
