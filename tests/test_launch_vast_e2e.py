"""``launch`` over the ``vast`` provider: FakeVast for the API, a real sshd as the instance."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.run.fetch import verify_sums
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.providers.vast import VastProvider
from controller.spec.loader import load_spec
from controller.vast.client import VastClient
from controller.vast.readiness import Deadlines
from tests.test_launch_local import write_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

NO_WAIT = {k: 0.0 for k in ("show", "create", "destroy", "list", "search", "other")}


class Recorder:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.lines: list[str] = []
        self.snaps: list[Any] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def update(self, snap: Any) -> None:
        self.snaps.append(snap)

    def log(self, lines: list[str]) -> None:
        self.lines.extend(lines)


def vast_spec(tmp_path: Path, name: str = "v1", **kw: Any) -> Path:
    root = tmp_path / "instance-root"
    return write_spec(tmp_path, name=name, budget=5.0, provider={
        "type": "vast", "remote_root": str(root), "remote_python": sys.executable}, **kw)


def vast_provider(fake: Any, sshd: Any, **kw: Any) -> VastProvider:
    client = VastClient(base_url=fake.url, api_key=fake.api_key, min_intervals=NO_WAIT,
                        sleep=lambda s: None)
    return VastProvider(client, ssh_user=sshd.user, key_path=sshd.key_path,
                        deadlines=Deadlines(poll_s=0.01), ssh_retry_s=0.05,
                        sleep=lambda s: None, **kw)


def secret_free(fake: Any, root: Path) -> None:
    """The account key is in no request body and no file shipped to the instance."""
    for req in fake.requests:
        assert fake.api_key not in json.dumps(req.get("json") or req.get("body") or "")
    for path in root.rglob("*"):
        if path.is_file():
            assert fake.api_key.encode() not in path.read_bytes(), path


def test_vast_launch_end_to_end(tmp_path: Path, fake_vast: Any, sshd: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_123456")
    spec = load_spec(vast_spec(tmp_path))
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    rec = Recorder()
    orch = Orchestrator(journal, provider, reporter=rec)
    estimate = provider.estimate(spec)
    assert estimate.est_usd is not None and estimate.est_usd <= 5.0
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    outcome = orch.drive(run_id, Options(poll_interval=0.1), estimate)

    assert outcome.state == "done", outcome.error
    assert verify_sums(out) >= 3
    creates = fake_vast.calls("PUT", "/api/v0/asks/")
    destroys = fake_vast.calls("DELETE", "/api/v0/instances/")
    assert len(creates) == 1 and len(destroys) == 1
    assert creates[0]["json"]["label"] == f"flux-remote:{run_id}"
    attach = fake_vast.calls("POST", "/api/v0/instances/")
    assert len(attach) == 1 and attach[0]["json"]["ssh_key"].startswith("ssh-ed25519 ")
    assert fake_vast.instances == {} or all(
        i.get("actual_status") in (None, "destroyed") for i in fake_vast.instances.values())
    [inst] = journal.instances(run_id)
    assert inst["state"] == "destroyed" and inst["dph_total"] > 0
    receipt = json.loads((out / "controller_receipt.json").read_text())
    assert receipt["instance_id"] == inst["instance_id"] and receipt["metered_usd"] > 0
    # the estimate made before renting sits beside the bill (bench_estimate compares the two)
    assert receipt["estimated_usd"] == journal.get_run(run_id)["est_usd"] > 0
    assert rec.lines and any(s.step for s in rec.snaps)

    root = tmp_path / "instance-root"
    secret_free(fake_vast, root)
    plan = (root / run_id / "plan.json").read_text()
    assert "hf_canary_token_123456" not in plan
    secrets_file = json.loads(plan)["secrets_file"]
    assert secrets_file and not secrets_file.startswith(str(root / run_id))
    assert not os.path.exists(secrets_file)  # removed before the destroy
    assert "hf_canary_token_123456" not in journal.path.read_bytes().decode("latin-1")


def test_offer_gone_moves_to_the_next_offer(tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    spec = load_spec(vast_spec(tmp_path, name="v2"))
    journal = open_journal()
    twins = [{**o, "id": int(o["id"]) + 1000, "dph_total": float(o["dph_total"]) * 1.1}
             for o in fake_vast.offers]
    fake_vast.offers.extend(twins)
    provider = vast_provider(fake_vast, sshd)
    estimate = provider.estimate(spec)
    assert len(estimate.plan.offers) >= 2
    first = estimate.plan.offers[0].offer_id
    fake_vast.offer_gone_ids.add(int(first))
    orch = Orchestrator(journal, provider)
    run_id = orch.create_run(spec, estimate, out_dir=tmp_path / "o2")
    outcome = orch.drive(run_id, Options(poll_interval=0.1, detach=True), estimate)
    assert outcome.detached
    rows = journal.instances(run_id)
    assert [r["state"] for r in rows] == ["failed", "live"]
    assert rows[0]["offer_id"] == str(first)
    orch.down(run_id, force=True)
    assert journal.instances(run_id)[-1]["state"] == "destroyed"
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1


def test_an_instance_that_fails_to_start_is_destroyed_and_the_next_offer_used(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.offers.extend({**o, "id": int(o["id"]) + 1000, "dph_total": float(o["dph_total"])
                             * 1.1} for o in list(fake_vast.offers))
    fake_vast.image_pull_error(40000001)  # the first instance FakeVast creates
    spec = load_spec(vast_spec(tmp_path, name="v3"))
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    rec = Recorder()
    orch = Orchestrator(journal, provider, reporter=rec)
    estimate = provider.estimate(spec)
    run_id = orch.create_run(spec, estimate, out_dir=tmp_path / "o3")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    rows = journal.instances(run_id)
    assert [r["state"] for r in rows] == ["destroyed", "live"]
    assert rows[0]["instance_id"] == "40000001"
    assert any("did not become ready" in n for n in rec.notes)
    orch.down(run_id, force=True)
    deleted = [c["path"] for c in fake_vast.calls("DELETE", "/api/v0/instances/")]
    assert deleted == ["/api/v0/instances/40000001/", f"/api/v0/instances/{rows[1]['instance_id']}/"]
    assert fake_vast.instances == {}
