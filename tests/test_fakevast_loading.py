"""The fake's image pull (``loading_s``) that bench/bench_batch_reuse.py measures machine reuse
with (issue 17 part 2; the reuse itself, seen from the fake's bill: tests/test_batch_scheduler.py)."""

from __future__ import annotations

import pytest

from controller.vast.client import VastClient
from tests.fakevast import FakeVast
from tests.test_launch_vast_e2e import NO_WAIT


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
