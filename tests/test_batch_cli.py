"""``flux-remote launch batch.yaml`` and the commands that accept a batch id (local provider)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from controller.journal import open_journal
from controller.ui import BatchView, batch_table
from tests.test_batch_scheduler import batch_file
from tests.test_launch_local import invoke, write_spec


def local_batch(tmp_path: Path, name: str, runs: int, *, steps: int = 4,
                max_parallel: int = 2) -> Path:
    spec = write_spec(tmp_path, name=name, steps=steps)
    return batch_file(spec, {"max_usd": 5, "max_parallel": max_parallel,
                             "sweep": {"training.lr": [1e-3 * (i + 1) for i in range(runs)]}})


@pytest.mark.slow
def test_launch_a_batch_then_status_ls_cost_down_resume(tmp_path: Path) -> None:
    path = local_batch(tmp_path, "cl", 2)
    plan = invoke("launch", path, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    assert [r["name"] for r in json.loads(plan.output)["runs"]] == ["cl-lr1e-3", "cl-lr2e-3"]
    assert open_journal().list_batches() == []  # a dry run journals nothing

    out = tmp_path / "out"
    result = invoke("launch", path, "--yes", "--json", "--out", out, "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert done["ok"] and done["state"] == "done"
    batch_id = done["batch_id"]
    assert [r["slot_state"] for r in done["runs"]] == ["done", "done"]
    assert Path(done["summary"]) == out / "batch_summary.json" and Path(done["report"]).exists()

    status = json.loads(invoke("status", batch_id, "--json").output)
    assert status["batch"]["state"] == "done" and len(status["batch"]["runs"]) == 2
    listing = json.loads(invoke("ls", "--json").output)
    assert [b["batch_id"] for b in listing["batches"]] == [batch_id]
    assert len(listing["runs"]) == 2 and all(r["batch_id"] == batch_id for r in listing["runs"])
    cost = json.loads(invoke("cost", batch_id[:12], "--json").output)
    assert len(cost["runs"]) == 2
    text = invoke("status", batch_id)
    assert "cl-lr1e-3" in text.output and "of $5.00" in text.output

    again = invoke("resume", batch_id, "--yes", "--json")  # nothing left to do: no new runs
    assert json.loads(again.output)["state"] == "done"
    assert len(open_journal().runs_of_batch(batch_id)) == 2
    down = invoke("down", batch_id, "--json")
    assert down.exit_code == 0 and json.loads(down.output)["runs"] == []


def test_launch_refuses_detach_for_a_batch(tmp_path: Path) -> None:
    result = invoke("launch", local_batch(tmp_path, "dt", 2), "--yes", "--detach", "--json")
    assert result.exit_code != 0 and "--detach" in json.loads(result.output)["message"]


@pytest.mark.slow
def test_resume_after_the_controller_is_killed_mid_batch(tmp_path: Path) -> None:
    path = local_batch(tmp_path, "kb", 3, steps=30)  # no run ends before the kill
    out = tmp_path / "out"
    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "controller", "launch", str(path), "--yes",
                             "--json", "--out", str(out), "--poll-interval", "0.2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = open_journal()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        running = [r for r in journal.list_runs() if r["state"] == "running" and
                   (r["step"] or 0) >= 1]
        if len(running) == 2:
            break
        assert proc.poll() is None, "the controller ended before two runs trained"
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("two runs never trained at once")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [batch] = journal.list_batches()
    assert [s["state"] for s in journal.batch_runs(batch["batch_id"])] == \
        ["active", "active", "pending"]

    result = invoke("resume", batch["batch_id"], "--yes", "--json", "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "done"
    runs = journal.runs_of_batch(batch["batch_id"])
    assert len(runs) == 3 and all(r["state"] == "done" for r in runs)
    for run in runs:  # one machine row per run: none rented twice (a finished run's machine
        [inst] = journal.instances(run["run_id"])  # may have gone on to the next run)
        assert inst["state"] in ("destroyed", "handed_over")
    assert not [i for i in journal.instances() if i["state"] not in ("destroyed", "handed_over")]
    assert (out / "batch_summary.json").exists()


def test_the_batch_view_renders_a_table_and_log_lines() -> None:
    rows = [{"name": "a", "run_id": "a-1", "slot_state": "active", "state": "running",
             "stage": "train", "step": 3, "total": 8, "loss": 0.5, "spend_usd": 0.1,
             "note": None},
            {"name": "b", "run_id": None, "slot_state": "skipped", "state": "skipped",
             "note": "skipped: budget (needs $2.00)", "spend_usd": 0.0}]
    ledger = {"spent_usd": 0.1, "committed_usd": 1.1, "total_usd": 3.0}
    buf = io.StringIO()
    Console(file=buf, width=100).print(batch_table(rows, ledger, title="batch x"))
    text = buf.getvalue()
    assert "3/8" in text and "0.5000" in text and "skipped: budget" in text
    assert "of $3.00" in text
    buf = io.StringIO()
    view = BatchView(Console(file=buf, width=100), title="batch x")
    view.show(rows, ledger, notes=[("a", "renting offer 7")])
    view.show(rows, ledger)  # unchanged rows are not printed again
    lines = buf.getvalue().splitlines()
    assert lines[0] == "- a: renting offer 7"
    assert lines[1:] == ["a: running, train 3/8", "b: skipped: budget (needs $2.00)"]


def test_stop_a_batch_before_it_ran_cancels_its_runs(tmp_path: Path) -> None:
    from controller.batch.setup import create_batch
    from controller.spec.loader import load_file

    journal = open_journal()
    batch_id = create_batch(journal, load_file(local_batch(tmp_path, "st", 2)),
                            out_dir=tmp_path / "out")
    result = invoke("stop", batch_id, "--json")
    assert result.exit_code != 0  # nothing finished: the batch did not succeed
    data = json.loads(result.output)
    assert data["state"] == "partial" and [r["slot_state"] for r in data["runs"]] == \
        ["stopped", "stopped"]
    assert journal.runs_of_batch(batch_id) == []  # nothing was started
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert [r["result"] for r in summary["runs"]] == ["stopped", "stopped"]


def test_the_batch_view_on_a_terminal_is_one_live_table() -> None:
    rows = [{"name": "a", "run_id": "a-1", "slot_state": "active", "state": "running",
             "stage": "train", "step": 3, "total": 8, "loss": 0.5, "spend_usd": 0.1,
             "note": None}]
    buf = io.StringIO()
    view = BatchView(Console(file=buf, width=100, force_terminal=True), title="batch t")
    view.show(rows, {"spent_usd": 0.1, "committed_usd": 1.0, "total_usd": 3.0})
    view.show([{**rows[0], "step": 4}], {"spent_usd": 0.2, "committed_usd": 1.0,
                                          "total_usd": 3.0})
    view.close()
    assert "4/8" in buf.getvalue() and "batch t" in buf.getvalue()
