"""Runs against FakeVast as the service really behaves (issue 14), with a real sshd as the
instance: no container variables in SSH sessions, onstart after ``running``, ``exited`` on stop,
``scheduling`` on start, the image's Python only on the image's PATH.

A stopped container has no sshd: the fake's ``on_state`` stops this test's sshd when the instance
exits and starts it again when the instance runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.journal import open_journal
from controller.run.fetch import verify_sums
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from tests.faults import wait_for
from tests.fakevast import DEFAULT_IMAGE_PATH
from tests.test_launch_local import write_spec
from tests.test_launch_vast_e2e import Recorder, vast_provider

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

# The laptop: create and drive a run until it is SIGKILLed (no cleanup can run).
LAPTOP = r"""
import json, sys
from pathlib import Path
from controller.journal import open_journal
from controller.providers.vast import VastProvider
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from controller.vast.client import VastClient
from controller.vast.readiness import Deadlines

args = json.loads(sys.argv[1])
client = VastClient(base_url=args["url"], api_key=args["key"],
                    min_intervals={k: 0.0 for k in ("show", "create", "destroy", "list",
                                                    "search", "other")}, sleep=lambda s: None)
provider = VastProvider(client, ssh_user=args["user"], key_path=Path(args["ssh_key"]),
                        deadlines=Deadlines(poll_s=0.01), ssh_retry_s=0.05, sleep=lambda s: None)
orch = Orchestrator(open_journal(), provider)
spec = load_spec(args["spec"])
estimate = provider.estimate(spec)
run_id = orch.create_run(spec, estimate, out_dir=Path(args["out"]))
print(run_id, flush=True)
orch.drive(run_id, Options(poll_interval=0.2))
"""


def container_follows(fake: Any, sshd: Any) -> None:
    """The instance's sshd lives and dies with its container."""
    def on_state(iid: int, status: str) -> None:
        if status in ("exited", "destroyed"):
            sshd.stop()
        elif status == "running":
            sshd.start()
    fake.on_state = on_state


def test_laptop_killed_the_agent_stops_its_instance_and_fetch_restarts_fetches_destroys(
        tmp_path: Path, fake_vast: Any, sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    container_follows(fake_vast, sshd)
    monkeypatch.setenv("FLUX_REMOTE_TINY_STEP_DELAY", "1.0")  # forwarded to the agent
    spec_path = write_spec(tmp_path, name="sigkill", budget=5.0, steps=6, provider={
        "type": "vast", "remote_root": str(tmp_path / "instance-root"),
        "remote_python": sys.executable, "heartbeat_grace_s": 10})
    out = tmp_path / "bundle"
    args = {"url": fake_vast.url, "key": fake_vast.api_key, "user": sshd.user,
            "ssh_key": str(sshd.key_path), "spec": str(spec_path), "out": str(out)}
    laptop = subprocess.Popen([sys.executable, "-c", LAPTOP, json.dumps(args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        run_id = laptop.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert run_id, laptop.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        status = tmp_path / "instance-root" / run_id / "status.json"

        def training() -> bool:
            try:
                return int(json.loads(status.read_text()).get("step") or 0) >= 1
            except (OSError, ValueError):
                return False
        assert wait_for(training, timeout=240, interval=0.5), "training never started"
    finally:
        laptop.send_signal(signal.SIGKILL)  # the laptop dies: nothing of it runs any more
        laptop.wait(timeout=30)
    [iid] = fake_vast.instances
    # SSH sessions never had the container variables: the agent read the onstart's 0600 file.
    env_file = tmp_path / "instance-root" / ".instance" / "vast.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert f"container-key-{iid}" not in (tmp_path / "instance-root" / run_id / "agent.log"
                                          ).read_text()

    assert wait_for(lambda: fake_vast.instances[iid]["actual_status"] == "exited",
                    timeout=180, interval=0.5), "the agent never stopped its own instance"
    stops = [r for r in fake_vast.calls("PUT", f"/api/v0/instances/{iid}/")
             if (r["json"] or {}).get("state") == "stopped"]
    assert [r["headers"]["Authorization"] for r in stops] == [f"Bearer container-key-{iid}"]
    assert sshd.pid is None  # the container is down with it

    orch = Orchestrator(open_journal(), vast_provider(fake_vast, sshd), reporter=Recorder())
    result = orch.fetch_now(run_id)  # `flux-remote fetch RUN`
    assert result["bundle"] == str(out) and verify_sums(out) >= 3
    starts = [r for r in fake_vast.calls("PUT", f"/api/v0/instances/{iid}/")
              if (r["json"] or {}).get("state") == "running"]
    assert len(starts) == 1
    assert fake_vast.instances == {}  # destroyed once the bundle was home and verified
    assert orch.journal.get_run(run_id)["state"] == "done"
    assert orch.journal.current_instance(run_id) is None
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1


def test_a_run_on_an_image_whose_python_is_only_on_its_path_finishes(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    """pytorch/pytorch sets PATH=/opt/conda/bin:... in the image; SSH sessions do not see it.
    Here the image's Python (the only one with torch) is on the image's PATH only, onstart runs
    two seconds after ``running``, and the new instance reads back as null twice at first."""
    conda = tmp_path / "image" / "opt" / "conda" / "bin"
    conda.mkdir(parents=True)
    wrapper = conda / "python3"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.image_path = f"{conda}:{DEFAULT_IMAGE_PATH}"
    fake_vast.onstart_delay_s = 2.0
    fake_vast.unlisted_polls = 2
    spec = load_spec(write_spec(tmp_path, name="conda", budget=5.0, provider={
        "type": "vast", "remote_root": str(tmp_path / "instance-root")}))
    assert spec.provider.remote_python == "python3"  # the default: find the image's own
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    rec = Recorder()
    orch = Orchestrator(journal, provider, reporter=rec)
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    began = time.monotonic()
    outcome = orch.drive(run_id, Options(poll_interval=0.1), estimate)
    assert outcome.state == "done", outcome.error
    assert verify_sums(out) >= 3
    [used] = journal.events(run_id, kind="remote_python")
    assert used["detail"]["python"] == str(wrapper)
    plan = json.loads((tmp_path / "instance-root" / run_id / "plan.json").read_text())
    assert plan["instance"]["python"] == str(wrapper)
    assert any("boot script done" in n for n in rec.notes)
    assert time.monotonic() - began >= 2.0  # the first rsync waited for onstart
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1  # null at first: not a 2nd rent
    assert fake_vast.instances == {}


def test_the_metered_spend_of_a_finished_run_matches_the_fakes_own_bill(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    """Hours x dph_total (storage at the allocated disk included) + GB x inet_down_cost: what the
    controller meters (receipt) is within 5% of what the service bills. One clock for both,
    30x faster than real time, so that GPU hours weigh as they do in a real run."""
    from controller.planning.planner import boot_download_gb

    t0 = time.time()

    def fast() -> float:
        return t0 + (time.time() - t0) * 30

    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.clock = fast
    spec = load_spec(write_spec(tmp_path, name="bill", budget=5.0, provider={
        "type": "vast", "remote_root": str(tmp_path / "instance-root"),
        "remote_python": sys.executable}))
    fake_vast.image_gb = boot_download_gb(spec)  # what this host's image, pip and hub pulls weigh
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd, clock=fast)
    orch = Orchestrator(journal, provider, reporter=Recorder(), clock=fast)
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    assert orch.drive(run_id, Options(poll_interval=0.1), estimate).state == "done"
    [row] = journal.instances(run_id)
    iid = int(row["instance_id"])
    shipped = sum(p.stat().st_size for sub in ("dataset", "remote")
                  for p in (tmp_path / "instance-root" / run_id / sub).rglob("*") if p.is_file())
    fake_vast.receive(iid, shipped / 1e9)  # the rsync uploads, as the host's NIC counted them
    bill = fake_vast.bill(iid)
    assert bill["gpu"] > 0 and bill["storage"] > 0 and bill["bandwidth"] > 0
    receipt = json.loads((out / "controller_receipt.json").read_text())
    assert receipt["metered_usd"] == pytest.approx(bill["total"], rel=0.05), (receipt, bill)
    assert receipt["bandwidth_usd"] == pytest.approx(bill["bandwidth"], rel=0.05)
