"""Machine reuse seen from the service's bill (issue 17 part 2): a sweep with
``reuse_machines`` rents fewer instances than it has runs and leaves none behind; and the fake's
image pull (``loading_s``) that bench/bench_batch_reuse.py measures with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.batch.scheduler import BatchScheduler
from controller.batch.setup import create_batch
from controller.journal import open_journal
from controller.spec.loader import load_file
from controller.vast.client import VastClient
from tests.fakevast import FakeVast
from tests.test_batch_scheduler import FAST, add_twin_offers, batch_file
from tests.test_launch_vast_e2e import NO_WAIT, vast_provider, vast_spec


@pytest.mark.ssh
def test_a_reusing_sweep_rents_fewer_machines_than_runs_and_destroys_them(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_twin_offers(fake_vast, 2)
    path = batch_file(vast_spec(tmp_path, name="ru", steps=2), {
        "max_usd": 20, "max_parallel": 1, "reuse_machines": True,
        "sweep": {"training.lr": [1e-3, 2e-3]}})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")

    def factory(name: str, claims: Any) -> Any:
        return vast_provider(fake_vast, sshd, offer_claims=claims,
                             measured_s_per_step=journal.measured_s_per_step())

    result = BatchScheduler(journal, batch_id, provider_factory=factory, options=FAST).run()

    runs = journal.runs_of_batch(batch_id)
    assert result.state == "done" and [r["state"] for r in runs] == ["done"] * 2, json.dumps(
        [{k: r.get(k) for k in ("name", "state", "error")} for r in runs], indent=1)
    created = fake_vast.created()
    assert 1 <= len(created) < len(runs)  # the service's view: fewer machines than runs
    assert fake_vast.instances == {}  # every one destroyed at the end
    bills = [fake_vast.bill(iid) for iid in created]
    assert all(b["instance_hours"] > 0 and b["total"] > 0 for b in bills)


def test_loading_s_holds_a_new_instance_in_loading_for_its_pull() -> None:
    now = [1000.0]
    with FakeVast(loading_polls=0, loading_s=30.0, clock=lambda: now[0]) as fake:
        client = VastClient(fake.api_key, fake.url, min_intervals=NO_WAIT, sleep=lambda s: None)
        iid = client.create_instance(fake.offers[0]["id"], image="img", disk_gb=40, label="x")
        seen = [client.show_instance(iid)["actual_status"] for _ in range(3)]
        assert seen[-1] == "loading" and "running" not in seen
        now[0] += 31.0
        assert client.show_instance(iid)["actual_status"] == "running"
        bill = fake.bill(iid)
        # Reference README: storage bills while loading, the GPU only once running
        assert bill["hours"] == 0.0 and bill["storage"] > 0
        assert bill["instance_hours"] == pytest.approx(31.0 / 3600)
        client.stop_instance(iid)
        client.start_instance(iid)
        statuses = [client.show_instance(iid)["actual_status"] for _ in range(4)]
        assert statuses[-1] == "running"  # a restart does not pull the image again
