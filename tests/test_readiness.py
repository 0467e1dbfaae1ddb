"""Instance readiness: phases, deadlines, fast failures, and the SSH endpoint."""

from __future__ import annotations

import copy

import pytest
import responses

from controller.errors import ProviderError
from controller.vast.client import VastClient
from controller.vast.errors import InstanceNotReadyError
from controller.vast.readiness import (
    Deadlines,
    Phase,
    failure_reason,
    phase_of,
    ssh_endpoint,
    wait_until_running,
)
from tests.fakevast import FakeVast, reference

SEQ = reference("SYNTHETIC_instance_lifecycle.json")["sequence"]
URL = "https://vast.test"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Scripted:
    """A client whose show_instance returns the given records in turn (the last repeats)."""

    def __init__(self, records: list[dict | None]) -> None:
        self.records = [copy.deepcopy(r) for r in records]
        self.calls = 0

    def show_instance(self, instance_id: int) -> dict | None:
        record = self.records[min(self.calls, len(self.records) - 1)]
        self.calls += 1
        return copy.deepcopy(record)


def _inst(**fields) -> dict:
    base = copy.deepcopy(SEQ[1]["instances"])
    base.update(fields)
    return base


def test_full_lifecycle_to_running_over_http() -> None:
    clock = Clock()
    client = VastClient("k" * 20, URL, sleep=clock.sleep, clock=clock)
    with responses.RequestsMock() as rsps:
        for step in SEQ[:3]:
            rsps.add(responses.GET, f"{URL}/api/v0/instances/40000001/", json=step)
        seen: list[Phase] = []
        inst = wait_until_running(client, 40000001, clock=clock, sleep=clock.sleep,
                                  on_change=lambda phase, _i: seen.append(phase))
        assert len(rsps.calls) == 3
    assert seen == [Phase.PROVISIONING, Phase.LOADING, Phase.RUNNING]
    assert ssh_endpoint(inst) == ("203.0.113.7", 41022)


def test_image_pull_failure_fails_fast_with_the_instance_id() -> None:
    failed = reference("SYNTHETIC_instance_image_pull_failed.json")["instances"]
    client = Scripted([SEQ[0]["instances"], failed])
    clock = Clock()
    with pytest.raises(InstanceNotReadyError) as info:
        wait_until_running(client, 36716507, clock=clock, sleep=clock.sleep)
    assert info.value.instance_id == 36716507
    assert "manifest for vastai/test" in str(info.value)
    assert client.calls == 2


def test_error_message_while_loading_fails_even_if_intended_running() -> None:
    bad = _inst(status_msg="Error response from daemon: pull access denied for x/y")
    assert failure_reason(bad) and "pull access denied" in failure_reason(bad)
    assert failure_reason(_inst(status_msg="Pulling from pytorch/pytorch")) is None
    assert failure_reason(SEQ[2]["instances"]) is None


@pytest.mark.parametrize("status", ["exited", "unknown", "offline"])
def test_dead_states_fail_fast(status: str) -> None:
    clock = Clock()
    client = Scripted([_inst(actual_status=status)])
    with pytest.raises(InstanceNotReadyError, match=status) as info:
        wait_until_running(client, 40000001, clock=clock, sleep=clock.sleep)
    assert info.value.instance_id == 40000001


def test_vanished_instance_fails() -> None:
    clock = Clock()
    with pytest.raises(InstanceNotReadyError, match="disappeared"):
        wait_until_running(Scripted([None]), 1, clock=clock, sleep=clock.sleep)


def test_loading_past_its_deadline_fails() -> None:
    clock = Clock()
    client = Scripted([_inst()])
    limits = Deadlines(loading_s=60, poll_s=5)
    with pytest.raises(InstanceNotReadyError, match="stuck in loading") as info:
        wait_until_running(client, 40000001, deadlines=limits, clock=clock, sleep=clock.sleep)
    assert info.value.reason == "deadline:loading"
    assert 60 < clock.now <= 70


def test_each_phase_gets_its_own_deadline() -> None:
    clock = Clock()
    # 10 polls provisioning (50 s) then 10 loading (50 s): each under 60 s, total over.
    records = [SEQ[0]["instances"]] * 10 + [SEQ[1]["instances"]] * 10 + [SEQ[2]["instances"]]
    limits = Deadlines(provisioning_s=60, loading_s=60, poll_s=5)
    inst = wait_until_running(Scripted(records), 1, deadlines=limits, clock=clock,
                              sleep=clock.sleep)
    assert inst["actual_status"] == "running"


def test_unknown_state_is_waited_on_not_a_crash() -> None:
    clock = Clock()
    records = [_inst(actual_status="hibernating"), _inst(actual_status=3), SEQ[2]["instances"]]
    assert phase_of(records[0]) is Phase.UNKNOWN and phase_of(records[1]) is Phase.UNKNOWN
    inst = wait_until_running(Scripted(records), 1, clock=clock, sleep=clock.sleep)
    assert inst["actual_status"] == "running"


def test_unknown_state_still_times_out() -> None:
    clock = Clock()
    limits = Deadlines(provisioning_s=30, poll_s=5)
    with pytest.raises(InstanceNotReadyError, match="provisioning"):
        wait_until_running(Scripted([_inst(actual_status="weird")]), 1, deadlines=limits,
                           clock=clock, sleep=clock.sleep)


def test_running_without_endpoint_waits() -> None:
    clock = Clock()
    no_ports = _inst(actual_status="running", ports={}, ssh_host=None, ssh_port=None)
    inst = wait_until_running(Scripted([no_ports, SEQ[2]["instances"]]), 1, clock=clock,
                              sleep=clock.sleep)
    assert ssh_endpoint(inst) == ("203.0.113.7", 41022)


def test_ssh_endpoint_prefers_direct_then_proxy() -> None:
    captured = reference("show_instance_running_captured.json")["instances"]
    assert ssh_endpoint(captured) == ("ssh7.vast.ai", 37044)  # no 22/tcp mapping: proxy
    docs = reference("show_instance_docs_example.json")["instances"]  # ports is a list there
    assert ssh_endpoint(docs) == ("ssh2281.vast.ai", 10882)
    with pytest.raises(ProviderError):
        ssh_endpoint({"id": 1, "ports": None})


def test_wait_against_fakevast(fake_vast: FakeVast) -> None:
    """The fake moves null -> loading -> running; pull errors and dead hosts fail fast."""
    fake_vast.ssh_endpoint = ("127.0.0.1", 2022)
    fake_vast.loading_polls = 3
    clock = Clock()
    client = VastClient(sleep=clock.sleep, clock=clock)
    iid = client.create_instance(38450985, image="img", disk_gb=40, label="flux-remote:w")
    seen: list[Phase] = []
    inst = wait_until_running(client, iid, clock=clock, sleep=clock.sleep,
                              on_change=lambda phase, _i: seen.append(phase))
    assert seen == [Phase.PROVISIONING, Phase.LOADING, Phase.RUNNING]
    assert ssh_endpoint(inst) == ("127.0.0.1", 2022)
    other = client.create_instance(35365119, image="img", disk_gb=40, label="flux-remote:w2")
    fake_vast.image_pull_error(other)
    with pytest.raises(InstanceNotReadyError, match="not found"):
        wait_until_running(client, other, clock=clock, sleep=clock.sleep)
    fake_vast.interrupt(iid, "offline")
    with pytest.raises(InstanceNotReadyError, match="offline"):
        wait_until_running(client, iid, clock=clock, sleep=clock.sleep)
