"""Controlling a batch while it runs: ``stop BATCH`` and Ctrl-C from another process (local
provider, tiny trainer slowed down), and a Vast host that dies mid-run (FakeVast + real sshd)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from controller.batch.scheduler import BatchScheduler
from controller.batch.setup import create_batch
from controller.batch.stop import cancel_pending
from controller.errors import RunError
from controller.run.fetch import verify_sums
from controller.journal import open_journal
from controller.providers.local import LocalProvider
from controller.spec.loader import load_file
from tests.test_batch_cli import local_batch
from tests.test_batch_scheduler import FAST, add_twin_offers, batch_file
from tests.test_launch_local import invoke
from tests.test_launch_vast_e2e import vast_provider, vast_spec

WAIT_S = 60.0


def launch_in_background(path: Path, out: Path, delay: float = 0.3) -> subprocess.Popen[bytes]:
    """``flux-remote launch BATCH`` in its own process group (as a terminal's foreground job)."""
    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": str(delay)}
    # a terminal's job takes Ctrl-C even when this test runs as a background job (which starts
    # with SIGINT ignored, and a child inherits that)
    return subprocess.Popen([sys.executable, "-m", "controller", "launch", str(path), "--yes",
                             "--json", "--out", str(out), "--poll-interval", "0.2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_two_training(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Wait until two runs of the (only) batch report a training step; returns the batch."""
    journal = open_journal()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        running = [r for r in journal.list_runs() if r["state"] == "running" and
                   (r["step"] or 0) >= 1]
        if len(running) == 2:
            [batch] = journal.list_batches()
            return batch
        if proc.poll() is not None:
            pytest.fail(f"the controller ended before two runs trained: "
                        f"{proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("two runs never trained at once")


def agent_step(run: dict[str, Any]) -> int:
    """The step the agent itself reports in its run dir (not the controller's last poll)."""
    status = json.loads((Path(run["remote_run_dir"]) / "status.json").read_text())
    return int(status.get("step") or 0)


def agent_ended(run: dict[str, Any]) -> bool:
    return (Path(run["remote_run_dir"]) / "agent.rc").exists()


def wait_until(check: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting: {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_stop_a_batch_while_its_runs_train(tmp_path: Path) -> None:
    path = local_batch(tmp_path, "sb", 3, steps=40)
    out = tmp_path / "out"
    proc = launch_in_background(path, out)
    batch = wait_for_two_training(proc)
    batch_id = batch["batch_id"]

    stop = invoke("stop", batch_id, "--json")  # the launching process still drives the batch
    assert stop.exit_code == 0 and "STOP written" in stop.output, stop.output
    assert proc.wait(timeout=WAIT_S) != 0  # stopped runs: the batch did not succeed

    journal = open_journal()
    slots = journal.batch_runs(batch_id)
    assert [s["state"] for s in slots] == ["stopped", "stopped", "stopped"]
    runs = journal.runs_of_batch(batch_id)
    assert len(runs) == 2  # the pending run never started
    assert {r["name"] for r in runs} == {slots[0]["name"], slots[1]["name"]}
    for run in runs:
        assert run["state"] == "stopped", run["error"]
        assert (run["step"] or 0) < 40  # it stopped before the end
        assert verify_sums(Path(run["bundle_path"])) >= 3
        assert agent_ended(run)  # nothing left running on the machine
        assert [i["state"] for i in journal.instances(run["run_id"])] == ["destroyed"]
    assert journal.get_batch(batch_id)["state"] == "partial"
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [r["result"] for r in summary["runs"]] == ["stopped", "stopped", "stopped"]


class GatedLocal(LocalProvider):
    """The local provider, except that handing over a machine waits for ``gate`` (``entered``
    is set once the batch let it begin: the stop request was re-read before)."""

    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.entered = entered

    def acquire(self, run_id: str, spec: Any, estimate: Any, journal: Any, notify: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return super().acquire(run_id, spec, estimate, journal, notify)


def test_stop_a_batch_whose_run_has_no_agent_yet_stops_it_once_it_runs(tmp_path: Path) -> None:
    """``stop BATCH`` from another process cannot take down a run the batch's controller is
    still renting for: that controller writes its STOP once the agent runs."""
    journal = open_journal()
    batch_id = create_batch(journal, load_file(local_batch(tmp_path, "sd", 2, steps=40,
                                                           max_parallel=1)),
                            out_dir=tmp_path / "out")
    gate, entered = threading.Event(), threading.Event()
    said: list[Any] = []

    def tick(sched: BatchScheduler) -> None:
        if not said and entered.is_set():  # renting: past the batch's last look at a stop
            said.append(invoke("stop", batch_id, "--json"))  # as from another terminal
            gate.set()

    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0.2"}
    result = BatchScheduler(journal, batch_id, options=FAST, env=env, on_tick=tick,
                            provider_factory=lambda name, claims: GatedLocal(gate, entered)).run()

    assert said and said[0].exit_code == 0, said[0].output if said else "stop never ran"
    assert "STOP written" in said[0].output
    # STOP reaches the agent at once, mostly before training began: then it ends with nothing
    # to publish (as `stop RUN` would), which is not retried; else with what it trained.
    first, second = result.rows
    assert second["slot_state"] == "stopped" and not second["run_id"]  # it never started
    [run] = journal.runs_of_batch(batch_id)
    assert (run["step"] or 0) < 40, "the STOP never reached the agent"
    if run["state"] == "failed":
        assert "(cause: stopped)" in run["error"] and first["attempts"] == 1
    else:
        assert run["state"] == "stopped" and verify_sums(Path(run["bundle_path"])) >= 3
    assert journal.events(run["run_id"], "stop_deferred")
    assert [i["state"] for i in journal.instances(run["run_id"])] == ["destroyed"]


class StopLands(LocalProvider):
    """The local provider that runs ``stop BATCH`` (as from another terminal) once, from inside
    ``where``, and records every machine asked for (handing none over).

    ``estimate``: the scheduler has read the slot as pending and is pricing it; nothing is
    claimed yet. ``reconcile``: the run's drive holds its lock and rents next."""

    def __init__(self, batch_id: str, where: str, said: list[Any],
                 acquired: list[str]) -> None:
        super().__init__()
        self.batch_id, self.where, self.said, self.acquired = batch_id, where, said, acquired

    def _land(self, where: str) -> None:
        if where == self.where and not self.said:
            self.said.append(invoke("stop", self.batch_id, "--json"))

    def estimate(self, spec: Any) -> Any:
        self._land("estimate")
        return super().estimate(spec)

    def reconcile(self, journal: Any) -> list[str]:
        self._land("reconcile")
        return super().reconcile(journal)

    def acquire(self, run_id: str, spec: Any, estimate: Any, journal: Any, notify: Any) -> Any:
        self.acquired.append(run_id)
        raise RunError("the test's provider hands over no machine")


@pytest.mark.parametrize("where", ["estimate", "reconcile"])
def test_stop_a_batch_between_picking_a_slot_and_renting_rents_nothing(tmp_path: Path,
                                                                        where: str) -> None:
    """The race ``stop BATCH`` had: a slot read as pending just before the stop cancelled it
    was still claimed and rented for. Whether the stop lands before the slot is claimed or
    while the run's drive is about to rent, nothing is rented."""
    journal = open_journal()
    batch_id = create_batch(journal, load_file(local_batch(tmp_path, "sr", 2, max_parallel=1)),
                            out_dir=tmp_path / "out")
    said: list[Any] = []
    acquired: list[str] = []
    result = BatchScheduler(journal, batch_id, options=FAST, provider_factory=lambda name, c:
                            StopLands(batch_id, where, said, acquired)).run()

    assert said, f"the stop never landed in {where}"
    assert said[0].exit_code == 0 and "STOP written" in said[0].output, said[0].output
    assert acquired == []
    first, second = result.rows
    assert first["slot_state"] == "stopped" and second["slot_state"] == "stopped"
    assert "not started: the batch was asked to stop before it rented a machine" in first["note"]
    assert not second["run_id"]  # cancelled while pending: never claimed
    [run] = journal.runs_of_batch(batch_id)
    assert run["run_id"] == first["run_id"] and run["state"] == "stopped"
    assert run["error"].startswith("not started: the batch was asked to stop"), run["error"]
    assert journal.instances(run["run_id"]) == []
    states = [e["detail"]["state"] for e in journal.events(run["run_id"], "state")]
    if where == "estimate":  # seen when the slot was claimed: its drive never even began
        assert states == ["planned", "stopped"]
    else:
        assert states[-1] == "stopped", states
    assert result.state == "partial" and result.ledger["committed_usd"] == 0


def test_a_slot_pending_again_after_stop_batch_is_not_started(tmp_path: Path) -> None:
    """A slot set pending after the stop (an infrastructure failure's retry) starts nothing:
    the scheduler reads the stop before it even prices the slot."""
    journal = open_journal()
    batch_id = create_batch(journal, load_file(local_batch(tmp_path, "sp", 2, max_parallel=1)),
                            out_dir=tmp_path / "out")
    assert cancel_pending(journal, batch_id, "stopped by the user before it started") == 2
    journal.update_batch_run(batch_id, 0, state="pending", note="retry after: host lost")
    said: list[Any] = []
    acquired: list[str] = []
    provider = StopLands(batch_id, "nowhere", said, acquired)
    priced: list[Any] = []
    provider.estimate = lambda spec: priced.append(spec)  # type: ignore[method-assign]

    result = BatchScheduler(journal, batch_id, options=FAST,
                            provider_factory=lambda name, claims: provider).run()

    assert priced == [] and acquired == [] and journal.runs_of_batch(batch_id) == []
    assert [r["slot_state"] for r in result.rows] == ["stopped", "stopped"]
    assert result.rows[0]["note"] == "stopped by the user before it started"


@pytest.mark.slow
def test_ctrl_c_leaves_started_runs_going_and_resume_finishes_the_batch(tmp_path: Path) -> None:
    path = local_batch(tmp_path, "cc", 3, steps=10)
    out = tmp_path / "out"
    proc = launch_in_background(path, out, delay=0.25)
    batch = wait_for_two_training(proc)
    batch_id = batch["batch_id"]

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole foreground group
    assert proc.wait(timeout=WAIT_S) == 130
    assert b"resume " + batch_id.encode() in (proc.stderr.read() if proc.stderr else b"")

    journal = open_journal()
    assert [s["state"] for s in journal.batch_runs(batch_id)] == ["active", "active", "pending"]
    runs = journal.runs_of_batch(batch_id)
    assert len(runs) == 2 and all(r["state"] == "running" for r in runs)  # nothing more started
    before = {r["run_id"]: agent_step(r) for r in runs}
    wait_until(lambda: all(agent_ended(r) or agent_step(r) > before[r["run_id"]] for r in runs),
               "the started runs to keep training without their controller")
    time.sleep(0.5)
    assert len(journal.runs_of_batch(batch_id)) == 2  # and still nothing more started

    result = invoke("resume", batch_id, "--yes", "--json", "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "done"
    runs = journal.runs_of_batch(batch_id)
    assert len(runs) == 3 and all(r["state"] == "done" for r in runs)
    for run in runs:  # one machine row per run: none rented twice (a finished run's machine
        [inst] = journal.instances(run["run_id"])  # may have gone on to the next run)
        assert inst["state"] in ("destroyed", "handed_over")
        assert verify_sums(Path(run["bundle_path"])) >= 3
    assert not [i for i in journal.instances() if i["state"] not in ("destroyed", "handed_over")]


@pytest.mark.ssh
@pytest.mark.slow
def test_a_vast_host_that_dies_mid_run_is_stopped_and_the_run_retried_elsewhere(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_twin_offers(fake_vast, 2)
    # 30 steps of 0.2 s: a tick delayed on a loaded machine still finds the run mid-training
    # gpu.on_lost: stop: the batch's own retry is under test (a run that continues by itself
    # after a lost machine: tests/test_relaunch.py)
    path = batch_file(vast_spec(tmp_path, name="rt", steps=30, gpu={"on_lost": "stop"}), {
        "max_usd": 20, "max_parallel": 1, "retries": 1, "runs": [{"name": "rt-a"}]})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")
    died: dict[str, Any] = {}

    def factory(name: str, claims: Any) -> Any:
        # a dead host's connection is retried for 2 s (120 s for real) before Vast is asked
        return vast_provider(fake_vast, sshd, offer_claims=claims, reconnect_window_s=2.0)

    def tick(sched: BatchScheduler) -> None:
        """The first run's host dies once it trains; it comes back (for the retry's new
        instance, on the same sshd) once the batch has noticed."""
        [slot] = sched.slots()
        run = journal.get_run(slot["run_id"]) if slot["run_id"] else None
        if not died and run and run["state"] == "running" and (run["step"] or 0) >= 1:
            [row] = journal.instances(run["run_id"])
            died.update(run_id=run["run_id"], iid=int(row["instance_id"]),
                        offer=row["offer_id"], run_dir=run["remote_run_dir"])
            fake_vast.interrupt(died["iid"], "exited")
            sshd.stop()
            # the delay only had to keep this run mid-training until now: the retry's agent
            # (its Orchestrator is made later, from ``env``) trains at full speed
            env.pop("FLUX_REMOTE_TINY_STEP_DELAY", None)
        elif died and sshd.pid is None and slot["attempts"] == 2:
            sshd.start()

    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0.2"}  # forwarded to the agent
    result = BatchScheduler(journal, batch_id, provider_factory=factory, options=FAST,
                            env=env, on_tick=tick).run()
    try:
        assert result.state == "done", json.dumps(result.rows, indent=1, default=str)
        [row] = result.rows
        assert row["attempts"] == 2 and row["slot_state"] == "done"
        first, second = journal.runs_of_batch(batch_id)
        assert first["run_id"] == died["run_id"] and first["state"] == "failed"
        assert (first["step"] or 0) < 30  # it died mid-training
        assert "exited" in first["error"]
        assert second["state"] == "done" and verify_sums(Path(second["bundle_path"])) >= 3
        [again] = journal.instances(second["run_id"])
        assert again["offer_id"] != died["offer"] and again["state"] == "destroyed"
        # The dead host's instance is stopped (its disk kept for a later fetch), not destroyed,
        # and nothing bills for compute: it is the only instance left at Vast.
        assert [i["state"] for i in journal.instances(first["run_id"])] == ["stopped"]
        assert list(fake_vast.instances) == [died["iid"]]
        assert fake_vast.instances[died["iid"]]["intended_status"] == "stopped"  # "exited" now
        assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 2
    finally:
        sshd.start()
        # The first agent kept going on this machine (its "host" only lost its network): end it.
        Path(died.get("run_dir") or tmp_path / "none").joinpath("STOP").write_text("test over")
