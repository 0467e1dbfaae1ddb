"""SSH faults under a running launch (FakeVast + a real sshd as the instance).

* the sshd child serving the controller is killed during upload, polling and fetch: the
  controller reconnects, rsync resumes, the detached agent trains on untouched;
* sshd down for longer than the reconnect window: the controller gives up following (lost
  contact), the agent's watchdog stops the instance with the per-instance key, and ``resume``
  later starts it again and fetches.

Transport-level drops are in tests/test_hosts_ssh.py (reconnect, in-flight command, resumable
upload)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from controller.run.fetch import verify_sums
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from tests.faults import record
from tests.test_launch_vast_e2e import Recorder, vast_provider, vast_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


def test_connections_killed_throughout_a_run_change_nothing(tmp_path: Path, fake_vast: Any,
                                                            sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    spec = load_spec(vast_spec(tmp_path, name="drop", steps=4))
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    rec = Recorder()
    orch = Orchestrator(journal, provider, reporter=rec)
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    stop = threading.Event()
    kills: list[int] = []
    states: list[str] = []

    budget = {"shipping": 1, "running": 2, "fetching": 1}  # drops per phase, 1 s apart

    def dropper() -> None:
        while not stop.wait(0.15):
            run = journal.get_run(run_id)
            state = run["state"] if run else "?"
            if budget.get(state, 0) <= 0:
                continue
            killed = sshd.kill_connections()
            if killed:
                budget[state] -= 1
                kills.append(killed)
                states.append(state)
                stop.wait(1.0)

    thread = threading.Thread(target=dropper, daemon=True)
    thread.start()
    try:
        outcome = orch.drive(run_id, Options(poll_interval=0.1), estimate)
    finally:
        stop.set()
        thread.join()
    assert outcome.state == "done", outcome.error
    assert verify_sums(out) >= 3
    assert len(kills) >= 2 and "running" in states  # it really was cut, mid-run included
    assert len(journal.events(run_id, kind="agent_started")) == 1  # the agent never restarted
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1 and fake_vast.instances == {}
    run = journal.get_run(run_id)
    assert run["step"] == run["total"] == 4
    record("ssh:connections-killed", faults=len(kills), fake=fake_vast,
           bundles=[out])


def test_sshd_down_past_the_window_the_watchdog_stops_the_instance_and_resume_fetches(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    """Lost contact: the controller gives up following (journaled ``lost_contact``, the run stays
    ``running``); the agent finishes, its watchdog stops the instance with the per-instance key
    (never the account key); once SSH is back, ``resume`` starts the instance and fetches."""
    import sys

    from controller.errors import RunError
    from tests.faults import wait_for
    from tests.test_launch_local import write_spec

    iid = 40000001  # the first id FakeVast hands out
    container_key = f"container-key-{iid}"
    # SSH sessions do not get the container's variables (the sshd passes none, as on Vast): the
    # agent reads them from the file the onstart script wrote (FakeVast runs it with them).
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    spec = load_spec(write_spec(tmp_path, name="quiet", budget=5.0, steps=4, provider={
        "type": "vast", "remote_root": str(tmp_path / "instance-root"),
        "remote_python": sys.executable, "heartbeat_grace_s": 10}))
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd, reconnect_window_s=0.5)
    orch = Orchestrator(journal, provider, reporter=Recorder())
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    assert list(fake_vast.instances) == [iid]

    sshd.stop()  # down for much longer than the reconnect window
    with pytest.raises(RunError, match="lost contact"):
        orch.drive(run_id, Options(poll_interval=0.1, lost_contact_s=1.0))
    assert journal.get_run(run_id)["state"] == "running"
    assert journal.events(run_id, kind="lost_contact")

    assert wait_for(lambda: fake_vast.instances[iid]["actual_status"] == "exited",
                    timeout=60, interval=0.5), "the agent's watchdog never stopped the instance"
    # the agent used the instance's own key, never the account key
    self_stops = [r["headers"].get("Authorization") for r in fake_vast.calls("PUT")
                  if "Python-urllib" in r["headers"].get("User-Agent", "")
                  and (r["json"] or {}).get("state") == "stopped"]
    assert self_stops and set(self_stops) == {f"Bearer {container_key}"}

    sshd.start()
    orch2 = Orchestrator(open_journal(), vast_provider(fake_vast, sshd), reporter=Recorder())
    outcome = orch2.drive(run_id, Options(poll_interval=0.1))
    assert outcome.state == "done", outcome.error
    assert verify_sums(out) >= 3
    assert fake_vast.instances == {}
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1
    record("ssh:down-past-window+watchdog", faults=2, fake=fake_vast,
           bundles=[out])
