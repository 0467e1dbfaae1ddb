"""The controller SIGKILLed at each state transition; the next ``resume`` finishes the job.

The CLI runs as a real subprocess with ``FLUX_REMOTE_FAULT=after:<point>`` (a test-only knob in
``controller.journal.fault_point``: SIGKILL right after the journal committed that event). The
Vast API is FakeVast, the "instance" a real local sshd. To keep the set fast, each case is a
chain: ``launch`` is killed at the first point, then each ``resume`` at the next one, and a last
``resume`` must finish. Every kill point is thus a real SIGKILL followed by a resume, and the end
must be: bundle home and verified, one instance created for the run and destroyed exactly once,
no intent without a result, and a further ``resume`` changing nothing.
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
from tests.test_launch_vast_e2e import vast_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

# Kill points, in the order one run passes them. ``transfer`` is the first rsync of the process
# that is killed: the agent upload when it starts in ``shipping``, the bundle download when it
# starts in ``fetching``.
CHAINS = {
    "early": [
        "rent_intent",     # the rent intent is journaled, the create not sent
        "rent_result",     # create returned; nothing waited for, no SSH key attached yet
        "transfer",        # during upload: the agent is shipped, the dataset not yet
        "agent_started",   # during training: the agent was just started
    ],
    "late": [
        "state=booting",   # the instance is loading
        "state=fetching",  # the agent ended; the fetch is about to start
        "transfer",        # after the verified download, before the destroy
        "destroy_intent",  # between the destroy intent and the destroy call
    ],
}
RESUME = ("--yes", "--json", "--poll-interval", "0.2")


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_sigkill_at_each_transition_then_resume(chain: str, tmp_path: Path, fake_vast: Any,
                                                sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    use_sshd_key(sshd)
    spec = vast_spec(tmp_path, name=chain, steps=4)
    out = tmp_path / "bundle"
    journal = open_journal()
    run_id = ""
    for n, point in enumerate(CHAINS[chain]):
        args = (("launch", spec, "--yes", "--out", out, "--poll-interval", "0.2") if n == 0
                else ("resume", run_id, *RESUME))
        killed = controller(*args, env={"FLUX_REMOTE_FAULT": f"after:{point}"})
        assert killed.returncode == -9, (point, killed.returncode, killed.stdout[-2000:],
                                         killed.stderr[-2000:])
        [run] = journal.list_runs()
        run_id = run["run_id"]
        assert len(fake_vast.instances) <= 1, point  # never a second instance

    final = controller("resume", run_id, *RESUME)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    outcome = json.loads(final.stdout)
    assert outcome["state"] == "done", outcome
    assert verify_sums(out) >= 3

    creates = fake_vast.calls("PUT", "/api/v0/asks/")
    deletes = Counter(c["path"] for c in fake_vast.calls("DELETE", "/api/v0/instances/"))
    rows = journal.instances(run_id)
    created = [r["instance_id"] for r in rows if r["instance_id"]]
    assert len(creates) == 1 and len(created) == 1, rows
    assert deletes == {f"/api/v0/instances/{created[0]}/": 1}  # destroyed exactly once
    assert live_instances(fake_vast) == [] and fake_vast.instances == {}
    assert journal.pending_intents() == []
    assert {r["state"] for r in rows} <= {"destroyed", "failed"}
    kinds = [e["kind"] for e in journal.events(run_id)]
    assert kinds.count("agent_started") == 1  # the agent ran once, whatever was killed

    again = controller("resume", run_id, *RESUME)  # nothing left to do, nothing redone
    assert json.loads(again.stdout)["state"] == "done"
    assert sum(Counter(c["path"] for c in
                       fake_vast.calls("DELETE", "/api/v0/instances/")).values()) == 1
    record(f"sigkill:{chain}", faults=len(CHAINS[chain]), orphans=len(fake_vast.instances),
           lost=0 if (out / "SHA256SUMS").exists() else 1)
