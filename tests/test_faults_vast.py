"""Vast.ai API faults: 429 storms, 5xx, timeouts, a lost create answer, an offer gone, an instance
stuck loading, an instance lost mid-run, a stopped instance fetched later.

FakeVast answers the API (``fail_next``, ``drop_create_response``, ``offer_gone_ids``,
``interrupt``, a wrapped ``_list`` for an instance Vast lists late); a real sshd is the instance
where one must answer. Each test checks the end
state, that the journal has no intent without a result, and that no second instance exists.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from controller.errors import ProviderError
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.providers.vast import VastProvider
from controller.run.states import instance_label
from controller.spec.loader import load_spec
from controller.vast.client import CREATE_READ_BACK_S, VastClient
from controller.vast.readiness import Deadlines
from tests.faults import live_instances, record
from tests.test_launch_vast_e2e import NO_WAIT, Recorder, vast_provider, vast_spec

pytestmark = [pytest.mark.ssh]


class FakeClock:
    """Monotonic time that moves only when something sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def _twin_offers(fake: Any) -> None:
    fake.offers.extend({**o, "id": int(o["id"]) + 1000, "dph_total": float(o["dph_total"]) * 1.1}
                       for o in list(fake.offers))


def _detached_run(tmp_path: Path, fake: Any, sshd: Any, name: str, *,
                  spec_kw: dict[str, Any] | None = None,
                  **provider_kw: Any) -> tuple[Orchestrator, str, Any]:
    fake.ssh_endpoint = (sshd.host, sshd.port)
    spec = load_spec(vast_spec(tmp_path, name=name, **(spec_kw or {})))
    provider = vast_provider(fake, sshd, **provider_kw)
    orch = Orchestrator(open_journal(), provider, reporter=Recorder())
    estimate = provider.estimate(spec)
    run_id = orch.create_run(spec, estimate, out_dir=tmp_path / f"out-{name}")
    return orch, run_id, estimate


def _consistent(orch: Orchestrator, fake: Any) -> None:
    """No intent without a result; every instance the journal calls live exists, no other."""
    journal = orch.journal
    assert journal.pending_intents() == []
    live_rows = {r["instance_id"] for r in journal.instances() if r["state"] in ("live", "stopped")}
    assert live_rows == {str(i) for i in fake.instances}
    creates = fake.calls("PUT", "/api/v0/asks/")
    assert len({int(c["path"].split("/")[-2]) for c in creates}) >= len(journal.instances()) - \
        sum(1 for r in journal.instances() if r["state"] == "failed" and not r["instance_id"])


def test_429_storms_and_5xx_are_ridden_out_without_a_second_instance(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    _twin_offers(fake_vast)
    fake_vast.fail_next("POST", "/api/v0/bundles/", 429, {"msg": "slow down"}, times=3)
    fake_vast.fail_next("PUT", "/api/v0/asks/", 429, {"msg": "slow down"}, times=3)
    fake_vast.fail_next("GET", "/api/v0/instances/", 502, "Bad Gateway", times=2)
    fake_vast.fail_next("POST", "/api/v0/instances/", 503, "unavailable", times=2)  # attach key
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "storm")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    assert len(fake_vast.instances) == 1
    assert [r["state"] for r in orch.journal.instances(run_id)] == ["live"]
    _consistent(orch, fake_vast)
    fake_vast.fail_next("DELETE", "/api/v0/instances/", 500, "oops", times=2)
    orch.down(run_id, force=True)
    assert fake_vast.instances == {}
    _consistent(orch, fake_vast)
    record("vast:429-5xx-storm", faults=12, orphans=len(fake_vast.instances))


def test_a_lost_create_answer_is_found_by_label_not_created_twice(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.drop_create_response = True  # created on Vast, the answer never arrives
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "lost")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1
    [iid] = fake_vast.instances
    [row] = orch.journal.instances(run_id)
    assert row["state"] == "live" and row["instance_id"] == str(iid)
    orch.down(run_id, force=True)
    assert fake_vast.instances == {}
    _consistent(orch, fake_vast)
    record("vast:lost-create-answer", orphans=len(fake_vast.instances))


def test_a_create_that_never_answers_and_never_happened_is_sent_once_more(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.fail_next("PUT", "/api/v0/asks/", 504, "Gateway Timeout")  # refused, not made
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "retry")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 2 and len(fake_vast.instances) == 1
    orch.down(run_id, force=True)
    _consistent(orch, fake_vast)
    record("vast:create-5xx", orphans=len(fake_vast.instances))


def _hide_from_listings(fake: Any, hidden: set[int]) -> None:
    """Vast lists some instances late: ``GET /api/v1/instances/`` leaves out ids in ``hidden``
    (the test empties the set when they "appear")."""
    real_list = fake._list

    def late_list(query: dict[str, list[str]]) -> tuple[int, Any]:
        status, body = real_list(query)
        return status, {**body, "instances": [i for i in body["instances"]
                                              if i["id"] not in hidden]}

    fake._list = late_list


def test_a_lost_create_listed_after_the_window_is_destroyed_on_release(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    _twin_offers(fake_vast)  # the lost create took the first offer: the resend needs a next one
    fake_vast.drop_create_response = True  # made on Vast, answer lost, and not listed in time
    hidden: set[int] = set()
    real_create = fake_vast._create

    def create(offer_id: int, body: dict[str, Any]) -> Any:
        before = set(fake_vast.instances)
        answer = real_create(offer_id, body)
        if answer is None:
            hidden.update(set(fake_vast.instances) - before)
        return answer

    fake_vast._create = create  # type: ignore[method-assign]
    _hide_from_listings(fake_vast, hidden)
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "late")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    [late] = hidden
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == len(CREATE_READ_BACK_S)
    assert len(fake_vast.instances) == 2  # the read-back gave up: a second one was rented
    hidden.clear()  # ... and now Vast lists the first one too
    orch.down(run_id, force=True)
    assert fake_vast.instances == {}
    events = [e for e in orch.journal.events(run_id) if e["kind"].startswith("gc_destroy")]
    assert [(e["kind"], e["detail"]["instance_id"]) for e in events] == [
        ("gc_destroy_intent", str(late)), ("gc_destroy_result", str(late))]
    _consistent(orch, fake_vast)
    record("vast:lost-create-listed-late", orphans=len(fake_vast.instances))


def _released_run(fake: Any, run_id: str, **client_kw: Any) -> tuple[VastProvider, Any, int, int]:
    """A run with a live instance in the journal and a late duplicate under its label."""
    client = VastClient(base_url=fake.url, api_key=fake.api_key, min_intervals=NO_WAIT,
                        sleep=lambda s: None, **client_kw)
    journal = open_journal()
    journal.create_run(run_id=run_id, name=run_id, provider="vast", state="fetching", spec={},
                       out_dir="/nonexistent", budget_usd=1)
    offers = [int(o["id"]) for o in fake.offers]
    label = instance_label(run_id)
    current = client.create_instance(offers[0], image="img", disk_gb=10, label=label)
    row = journal.instance_intent(run_id, provider="vast", label=label)
    journal.instance_created(row, current)
    duplicate = client.create_instance(offers[1], image="img", disk_gb=10, label=label)
    return VastProvider(client, sleep=lambda s: None), journal, current, duplicate


def test_keep_data_does_not_sweep_and_a_later_release_does(fake_vast: Any) -> None:
    provider, journal, current, duplicate = _released_run(fake_vast, "keep")
    neighbour = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                           min_intervals=NO_WAIT, sleep=lambda s: None).create_instance(
        int(fake_vast.offers[0]["id"]), image="img", disk_gb=10, label="flux-remote:keep2")
    lists = len(fake_vast.calls("GET", "/api/v1/instances/"))
    provider.release("keep", journal, keep_data=True)
    assert fake_vast.instances[current]["actual_status"] == "exited"
    assert fake_vast.instances[duplicate]["intended_status"] == "running"  # untouched
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == lists  # no sweep at all
    provider.release("keep", journal)  # `down` later: destroys, then sweeps the label
    assert set(fake_vast.instances) == {neighbour}  # only the exact label is swept
    assert [e["kind"] for e in journal.events("keep") if e["kind"].startswith("gc_destroy")] \
        == ["gc_destroy_intent", "gc_destroy_result"]
    assert journal.pending_intents() == []
    record("vast:label-sweep-keep-data", fake=fake_vast, exclude=[neighbour])


def test_a_failing_sweep_listing_does_not_fail_the_release(fake_vast: Any) -> None:
    provider, journal, current, duplicate = _released_run(fake_vast, "sweepfail", max_attempts=2)
    fake_vast.fail_next("GET", "/api/v1/instances/", 500, "oops", times=2)
    provider.release("sweepfail", journal)  # does not raise
    assert current not in fake_vast.instances
    assert journal.current_instance("sweepfail") is None
    [event] = journal.events("sweepfail", kind="label_sweep_failed")
    assert event["detail"]["label"] == "flux-remote:sweepfail"
    assert [o["instance_id"] for o in provider.orphans(journal)] == [duplicate]  # gc's to find
    record("vast:label-sweep-list-fails", faults=2, orphans=0)


def test_every_offer_gone_fails_the_run_and_rents_nothing(tmp_path: Path, fake_vast: Any,
                                                          sshd: Any) -> None:
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "gone")
    fake_vast.offer_gone_ids.update(int(o["id"]) for o in fake_vast.offers)
    with pytest.raises(ProviderError, match="offers tried"):
        orch.drive(run_id, Options(detach=True), estimate)
    assert fake_vast.instances == {}
    assert orch.journal.get_run(run_id)["state"] == "failed"
    assert {r["state"] for r in orch.journal.instances(run_id)} == {"failed"}
    _consistent(orch, fake_vast)
    record("vast:offers-gone", orphans=len(fake_vast.instances))


def test_an_instance_stuck_loading_is_destroyed_and_the_next_offer_used(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    _twin_offers(fake_vast)
    fake_vast.loading_polls = 10 ** 6  # never leaves "loading"
    clock = FakeClock()
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "stuck", monotonic=clock)
    orch.provider.deadlines = Deadlines(provisioning_s=30, loading_s=60, running_s=30, poll_s=5)
    orch.provider.sleep = clock.sleep
    first: list[int] = []

    # the second instance starts normally: let it run once the first has been given up on
    real_destroy = fake_vast._destroy

    def destroy(iid: int) -> Any:
        first.append(iid)
        fake_vast.loading_polls = 0
        return real_destroy(iid)

    fake_vast._destroy = destroy  # type: ignore[method-assign]
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    rows = orch.journal.instances(run_id)
    assert [r["state"] for r in rows] == ["destroyed", "live"]
    assert first == [int(rows[0]["instance_id"])]
    assert clock.now >= 60  # the loading deadline passed on the injected clock, not for real
    orch.down(run_id, force=True)
    assert fake_vast.instances == {}
    _consistent(orch, fake_vast)
    record("vast:stuck-loading", orphans=len(fake_vast.instances))


def test_an_instance_outbid_mid_run_is_stopped_and_the_user_told(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    from controller.run.follow import MachineLost

    # gpu.on_lost: stop (a lost machine that continues: tests/test_relaunch.py)
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "outbid",
                                           spec_kw={"gpu": {"on_lost": "stop"}})
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    [iid] = fake_vast.instances
    fake_vast.interrupt(iid, "offline")
    sshd.stop()  # the host is gone with it
    orch2 = Orchestrator(open_journal(), vast_provider(fake_vast, sshd), reporter=Recorder(),
                         sleep=lambda s: None)
    orch2.provider.sleep = lambda s: None
    with pytest.raises((MachineLost, ProviderError)):
        orch2.drive(run_id, Options(poll_interval=0))
    run = orch2.journal.get_run(run_id)
    assert run["state"] == "failed" and f"flux-remote fetch {run_id}" in run["error"]
    assert fake_vast.instances[iid]["actual_status"] == "exited"  # kept, not billing compute
    assert orch2.journal.current_instance(run_id)["state"] == "stopped"
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1  # nothing rented in its place
    assert live_instances(fake_vast) == []
    sshd.start()
    record("vast:outbid-mid-run", orphans=0)


def test_a_stopped_instance_is_started_again_to_fetch(tmp_path: Path, fake_vast: Any,
                                                       sshd: Any) -> None:
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "restart")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    [iid] = fake_vast.instances
    orch.provider.release(run_id, orch.journal, keep_data=True)  # kept for a later fetch
    assert fake_vast.instances[iid]["actual_status"] == "exited"
    orch2 = Orchestrator(open_journal(), vast_provider(fake_vast, sshd), reporter=Recorder())
    orch2.fetch_now(run_id)
    starts = [c for c in fake_vast.calls("PUT", f"/api/v0/instances/{iid}/")
              if (c["json"] or {}).get("state") == "running"]
    assert len(starts) == 1
    # No bundle yet (the run was cut mid-way): the checkpoint and logs come home and the
    # instance is stopped again rather than left billing compute; `down` destroys it.
    assert orch2.journal.current_instance(run_id)["state"] == "stopped"
    assert fake_vast.instances[iid]["intended_status"] == "stopped"
    orch2.down(run_id, force=True)
    assert fake_vast.instances == {}
    record("vast:stopped-then-fetched", orphans=len(fake_vast.instances))


def test_create_asks_for_rsync_at_boot_and_bids_only_when_interruptible(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    orch, run_id, estimate = _detached_run(tmp_path, fake_vast, sshd, "boot")
    assert orch.drive(run_id, Options(detach=True), estimate).detached
    [create] = fake_vast.creates
    assert "rsync" in create["onstart"] and "onstart.done" in create["onstart"]
    assert "container-key" not in create["onstart"]  # names $CONTAINER_API_KEY, holds no key
    assert "price" not in create  # on-demand: no bid
    assert all(o.fits for o in orch.provider._candidates(load_spec(vast_spec(tmp_path, "boot")),
                                                         estimate))
    orch.down(run_id, force=True)


def test_client_timeouts_are_retried_then_reported_without_the_key(fake_vast: Any) -> None:
    client = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                        min_intervals=NO_WAIT, sleep=lambda s: None, max_attempts=3)
    fake_vast.fail_next("GET", "/api/v1/instances/", 500,
                        {"msg": f"internal error for key {fake_vast.api_key}"}, times=5)
    with pytest.raises(ProviderError) as info:
        client.list_instances()
    assert fake_vast.api_key not in str(info.value)
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == 3
    assert Counter(r["method"] for r in fake_vast.requests) == {"GET": 3}
    record("vast:5xx-give-up", faults=3)
