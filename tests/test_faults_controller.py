"""The controller SIGKILLed at each state transition; the next ``resume`` finishes the job.

The CLI runs as a real subprocess with ``FLUX_REMOTE_FAULT=after:<point>`` (a test-only knob in
``controller.journal.fault_point``: SIGKILL right after the journal committed that event). The
Vast API is FakeVast, the "instance" a real local sshd. Whatever the kill point, ``resume`` must
end with the bundle home and verified, every instance ever created destroyed exactly once, no
second instance for one intent, and no intent left without its result.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from controller.fetch import verify_sums
from controller.journal import open_journal
from tests.faults import controller, live_instances, record, use_sshd_key
from tests.test_launch_local import invoke
from tests.test_launch_vast_e2e import vast_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

KILL_POINTS = [
    # (FLUX_REMOTE_FAULT point, where the controller dies)
    ("rent_intent", "after the rent intent is journaled, before the create call"),
    ("rent_result", "after create returned, before waiting for the instance"),
    ("state=booting", "while the instance loads"),
    ("transfer", "during upload: the agent is shipped, the dataset not yet"),
    ("agent_started", "during training: the agent was just started"),
    ("state=fetching", "the agent ended; the fetch is about to start"),
    ("transfer@3", "after the verified fetch, before the destroy"),
    ("destroy_intent", "between the destroy intent and the destroy call"),
]


@pytest.mark.parametrize("point", [p for p, _ in KILL_POINTS])
def test_sigkill_at_each_transition_then_resume(point: str, tmp_path: Path, fake_vast: Any,
                                                sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    use_sshd_key(sshd)
    spec = vast_spec(tmp_path, name="kill", steps=4)
    out = tmp_path / "bundle"
    killed = controller("launch", spec, "--yes", "--out", out, "--poll-interval", "0.2",
                        env={"FLUX_REMOTE_FAULT": f"after:{point}"})
    assert killed.returncode == -9, (killed.returncode, killed.stdout[-2000:],
                                     killed.stderr[-2000:])
    journal = open_journal()
    [run] = journal.list_runs()
    run_id = run["run_id"]

    result = invoke("resume", run_id, "--yes", "--json", "--poll-interval", "0.2")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output)
    assert outcome["state"] == "done", outcome
    assert verify_sums(out) >= 3

    creates = fake_vast.calls("PUT", "/api/v0/asks/")
    deletes = Counter(c["path"] for c in fake_vast.calls("DELETE", "/api/v0/instances/"))
    rows = journal.instances(run_id)
    created = [r["instance_id"] for r in rows if r["instance_id"]]
    assert len(creates) == 1 and len(created) == 1, rows  # never two instances for one run
    assert deletes == {f"/api/v0/instances/{created[0]}/": 1}  # destroyed exactly once
    assert live_instances(fake_vast) == [] and fake_vast.instances == {}
    assert journal.pending_intents() == []
    assert {r["state"] for r in rows} <= {"destroyed", "failed"}

    again = invoke("resume", run_id, "--yes", "--json")  # nothing left to do, nothing redone
    assert json.loads(again.output)["state"] == "done"
    assert sum(Counter(c["path"] for c in
                       fake_vast.calls("DELETE", "/api/v0/instances/")).values()) == 1
    record(f"sigkill:{point}", orphans=len(fake_vast.instances),
           lost=0 if (out / "SHA256SUMS").exists() else 1)
