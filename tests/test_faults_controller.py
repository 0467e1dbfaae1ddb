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

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from controller.run.fetch import STAGING, verify_sums
from controller.hosts.rsync import PARTIAL_DIR
from controller.journal import open_journal
from tests.faults import controller, live_instances, record, use_sshd_key, wait_for
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
    record(f"sigkill:{chain}", faults=len(CHAINS[chain]), fake=fake_vast,
           bundles=[out])


BIG = "big.safetensors"
BIG_BYTES = 16_000_000
BWLIMIT_KBPS = 2000  # the big file takes ~8 s to come home: time to kill in the middle


def grow_bundle(publish: Path) -> None:
    """A bundle worth interrupting: a several-MB file in ``publish/``, listed in SHA256SUMS."""
    data = os.urandom(BIG_BYTES)
    (publish / BIG).write_bytes(data)
    with open(publish / "SHA256SUMS", "a", encoding="utf-8") as fh:
        fh.write(f"{hashlib.sha256(data).hexdigest()}  {BIG}\n")


def slow_rsync_path(tmp_path: Path) -> str:
    """A PATH whose ``rsync`` is the real one with ``--bwlimit`` (the controller runs rsync by
    name; the pulling side passes the limit on to the sending one)."""
    real = shutil.which("rsync")
    assert real is not None
    folder = tmp_path / "slow-bin"
    folder.mkdir()
    wrapper = folder / "rsync"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(real)} --bwlimit={BWLIMIT_KBPS} "$@"\n')
    wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def received(out: Path) -> int:
    """Bytes of the big file that arrived so far: rsync writes a hidden temp file until the file
    is whole (a partial one kept from an earlier try waits in the partial dir)."""
    staging = out / STAGING  # the bundle comes home there first (controller.run.fetch)
    temps = [*staging.glob(f".{BIG}.*"), staging / PARTIAL_DIR / BIG]
    return sum(path.stat().st_size for path in temps if path.is_file())


def group_alive(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group ``pgid``, as ``pid:comm``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, _, tail = (entry / "stat").read_text().rpartition(") ")
        except OSError:
            continue
        fields = tail.split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{entry.name}:{head.partition(' (')[2]}")
    return alive


@pytest.mark.parametrize("victim", ["group", "controller"])
def test_sigkill_in_the_middle_of_the_bundle_download_then_resume(
        victim: str, tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    """``resume`` is SIGKILLed while rsync is bringing the bundle home; the next ``resume``
    brings it home whole and destroys the instance once.

    ``group``: the controller with its rsync and ssh (a kill of the terminal's job): the
    rsync's temp file is left behind, the next fetch starts that file over and, once the bundle
    verifies, deletes the leftover. ``controller``:
    the controller alone (the OOM killer): its rsync lives on as an orphan and finishes the
    download by itself, while the next ``resume`` fetches beside it into the same folder."""
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    use_sshd_key(sshd)
    spec = vast_spec(tmp_path, name="mid", steps=4)
    out = tmp_path / "bundle"
    journal = open_journal()
    first = controller("launch", spec, "--yes", "--out", out, "--poll-interval", "0.2",
                       env={"FLUX_REMOTE_FAULT": "after:state=fetching"})
    assert first.returncode == -9, first.stderr[-2000:]
    [run] = journal.list_runs()
    run_id = run["run_id"]
    grow_bundle(Path(run["remote_run_dir"]) / "publish")

    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "resume", run_id, *RESUME],
        env={**os.environ, "PATH": slow_rsync_path(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: received(out) > BIG_BYTES // 5 or proc.poll() is not None,
                 timeout=90.0)
        assert proc.poll() is None and received(out) > 0, "the download never got going"
        assert not (out / BIG).exists()  # in the middle of the download
        if victim == "group":  # the controller, its rsync and rsync's ssh
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        assert proc.wait(timeout=30) == -9
        assert journal.get_run(run_id)["state"] == "fetching"
        assert [i["state"] for i in journal.instances(run_id)] != ["destroyed"]
        if victim == "group":
            assert wait_for(lambda: not group_alive(proc.pid), timeout=30.0), \
                group_alive(proc.pid)
            assert 0 < received(out) < BIG_BYTES and not (out / BIG).exists()

        final = controller("resume", run_id, *RESUME)
        # an orphaned rsync ends by itself once its download is done (nothing else is left)
        assert wait_for(lambda: not group_alive(proc.pid), timeout=90.0), group_alive(proc.pid)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert json.loads(final.stdout)["state"] == "done"
    assert verify_sums(out) >= 4 and (out / BIG).stat().st_size == BIG_BYTES
    if victim == "group":  # the killed rsync's temp file went once the bundle verified
        assert not list(out.glob(f".{BIG}.*")) and not (out / STAGING).exists()
    creates = fake_vast.calls("PUT", "/api/v0/asks/")
    [row] = journal.instances(run_id)
    assert len(creates) == 1 and row["state"] == "destroyed"
    deletes = Counter(c["path"] for c in fake_vast.calls("DELETE", "/api/v0/instances/"))
    assert deletes == {f"/api/v0/instances/{row['instance_id']}/": 1}  # destroyed exactly once
    assert live_instances(fake_vast) == [] and fake_vast.instances == {}
    assert journal.pending_intents() == []

    again = controller("resume", run_id, *RESUME)  # nothing left to do, nothing redone
    assert json.loads(again.stdout)["state"] == "done"
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1
    record(f"sigkill:mid-download:{victim}", faults=2, fake=fake_vast,
           bundles=[out])
