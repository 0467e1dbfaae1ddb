"""SSH dropped under a running launch: the sshd child serving the controller is killed again and
again (during upload, polling and fetch); the controller reconnects, rsync resumes, and the
detached agent trains on untouched. Transport-level drops are in tests/test_hosts_ssh.py
(reconnect, in-flight command, sshd down past the reconnect window, resumable upload)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from controller.fetch import verify_sums
from controller.journal import open_journal
from controller.orchestrator import Options, Orchestrator
from controller.spec_loader import load_spec
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
    record("ssh:connections-killed", faults=len(kills), orphans=len(fake_vast.instances),
           lost=0 if (out / "SHA256SUMS").exists() else 1)
