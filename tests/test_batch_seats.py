"""Several runs at once on one multi-GPU instance (batch.gpus_per_machine): FakeVast with a real
sshd, the tiny trainer; and the journal's seat accounting on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.batch import seats as S
from controller.batch.scheduler import BatchScheduler
from controller.batch.setup import batch_ledger, create_batch
from controller.journal import open_journal, seat_of
from controller.run.fetch import verify_sums
from controller.spec.loader import load_file
from tests.faults import controller, use_sshd_key
from tests.test_batch_scheduler import FAST, batch_file
from tests.test_launch_local import invoke
from tests.test_launch_vast_e2e import vast_provider, vast_spec


def add_two_gpu_offer(fake: Any, *, per_gpu: float, base_id: int = 50821030) -> dict[str, Any]:
    """A 2-GPU offer like the reference RTX 5090 offer the tiny spec is planned on: two of its
    GPUs, twice its RAM and CPUs, at ``per_gpu`` times its price for each GPU (Vast prices
    ``dph_total`` for the whole machine, e.g. reference/vast/offers.json's 2x and 4x bundles)."""
    [base] = [o for o in fake.offers if int(o["id"]) == base_id]
    offer = {**base, "id": int(base["id"]) + 777, "num_gpus": 2,
             "cpu_ram": float(base["cpu_ram"]) * 2, "cpu_cores": int(base["cpu_cores"]) * 2,
             "cpu_cores_effective": float(base["cpu_cores_effective"]) * 2,
             "total_flops": float(base["total_flops"]) * 2,
             # the search prices dph_total as dph_base + storage (tests/fakevast.py _search)
             "dph_base": float(base["dph_base"]) * 2 * per_gpu,
             "dph_total": float(base["dph_total"]) * 2 * per_gpu}
    fake.offers.append(offer)
    return offer


def run_batch(tmp_path: Path, fake: Any, sshd: Any, batch: dict[str, Any]) -> tuple[Any, Any, str]:
    path = batch_file(vast_spec(tmp_path, name="sw", steps=4), batch)
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")

    def factory(name: str, claims: Any) -> Any:
        return vast_provider(fake, sshd, offer_claims=claims,
                             measured_s_per_step=journal.measured_s_per_step())

    return BatchScheduler(journal, batch_id, provider_factory=factory, options=FAST).run(), \
        journal, batch_id


@pytest.mark.ssh
@pytest.mark.slow
def test_three_runs_share_one_two_gpu_instance(tmp_path: Path, fake_vast: Any,
                                               sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    offer = add_two_gpu_offer(fake_vast, per_gpu=0.6)
    result, journal, batch_id = run_batch(tmp_path, fake_vast, sshd, {
        "max_usd": 20, "max_parallel": 1, "sweep": {"training.lr": [1e-3, 2e-3, 3e-3]}})

    assert result.state == "done", json.dumps(result.rows, indent=1, default=str)
    runs = journal.runs_of_batch(batch_id)
    assert all(r["state"] == "done" for r in runs) and len(runs) == 3
    for run in runs:
        assert verify_sums(Path(run["bundle_path"])) >= 3
    # one instance: the 2-GPU offer, rented once, destroyed once, at the end
    creates = fake_vast.calls("PUT", "/api/v0/asks/")
    assert [c["path"] for c in creates] == [f"/api/v0/asks/{offer['id']}/"]
    assert fake_vast.instances == {} and len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1
    [instance_id] = {r["instance_id"] for r in journal.instances() if r["instance_id"]}
    rows = journal.machine_rows(instance_id)
    assert {seat_of(r)["seats"] for r in rows} == {2}
    first, second = rows[0], rows[1]
    assert seat_of(first)["seat"] == 0 and seat_of(second)["seat"] == 1
    # each seat billed at half the machine's price; the second opened after the first's setup
    [planned] = journal.events(first["run_id"], "estimate")
    machine_dph = planned["detail"]["plan"]["chosen"]["dph_total"]
    assert [r["dph_total"] for r in rows] == [pytest.approx(machine_dph / 2, rel=1e-3)] * 3
    assert second["billing_started_at"] >= min(
        e["at"] for e in journal.events(first["run_id"], "agent_stage")
        if e["detail"]["stage"] not in ("checks", "bootstrap"))
    # the seats' runs were told their GPU (plan.json's instance block; a handed-over run's dir
    # is removed from the instance, the others stay)
    for row in rows:
        plan_path = tmp_path / "instance-root" / row["run_id"] / "plan.json"
        if plan_path.exists():
            instance = json.loads(plan_path.read_text())["instance"]
            assert (instance["seat"], instance["seats"]) == (seat_of(row)["seat"], 2)
    # the first two trained at once
    assert second["billing_started_at"] < first["destroyed_at"]
    # the third run took the seat that freed first (a handover on one seat)
    third = rows[2]
    assert json.loads(third["detail"]).get("from_row") in (first["id"], second["id"])
    assert sorted(r["state"] for r in rows) == ["destroyed", "handed_over", "left"]
    # the ledger holds the whole machine: the seats' rows plus its idle seats
    idle = S.idle_usd(rows, 0.0)
    assert idle > 0  # seat 1 was empty while seat 0 set the machine up
    whole = (max(r["destroyed_at"] for r in rows) - rows[0]["billing_started_at"]) / 3600 \
        * rows[0]["dph_total"] * 2
    assert sum(S.row_usd(r, 0.0) for r in rows) + idle == pytest.approx(whole, rel=1e-6)
    entry = result.ledger["runs"][S.idle_key(first["run_id"])]
    assert entry["spent_usd"] == pytest.approx(idle, abs=1e-6)
    assert result.ledger["spent_usd"] <= 20
    # the summary's split: one machine, its setup and idle carried in equal thirds
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    [machine] = summary["machines"]
    assert machine["seats"] == 2 and len(machine["runs"]) == 3
    assert machine["idle_usd"] == pytest.approx(idle, abs=1e-5)
    assert machine["setup_share_usd"] == pytest.approx(machine["setup_usd"] / 3, abs=1e-6)
    assert sum(e["share_usd"] for e in summary["runs"]) == pytest.approx(
        sum(e["usd"] for e in summary["runs"]) + idle, abs=1e-4)
    assert summary["spent_usd"] == pytest.approx(
        sum(e["usd"] for e in summary["runs"]) + idle, abs=1e-5)
    # `cost BATCH` counts the idle GPUs too
    cost = json.loads(invoke("cost", batch_id, "--json").output)
    assert cost["idle_usd"] == pytest.approx(idle, abs=1e-5)
    assert cost["total_spend_usd"] == pytest.approx(
        sum(r["spend_usd"] for r in runs) + idle, abs=1e-5)
    # and so does the ledger rebuilt from the journal (resume)
    rebuilt = batch_ledger(journal, journal.get_batch(batch_id))
    assert rebuilt.spent() == pytest.approx(result.ledger["spent_usd"], abs=1e-4)


@pytest.mark.ssh
@pytest.mark.slow
def test_a_dear_two_gpu_offer_is_not_packed(tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_two_gpu_offer(fake_vast, per_gpu=10.0)
    result, journal, batch_id = run_batch(tmp_path, fake_vast, sshd, {
        "max_usd": 20, "max_parallel": 1, "sweep": {"training.lr": [1e-3, 2e-3]}})
    assert result.state == "done"
    rows = journal.instances()
    assert not any(seat_of(r) for r in rows)
    assert all(r["num_gpus"] == 1 for r in rows)


def two_seats(tmp_path: Path) -> tuple[Any, int, int]:
    """A journal with runs a, b, c; a rented a 2-GPU instance as seat 0, b sits on seat 1.
    Returns the journal and the two rows."""
    journal = open_journal(tmp_path / "j.db")
    for run_id in ("a", "b", "c"):
        journal.create_run(run_id=run_id, name=run_id, provider="vast", state="running",
                           spec={}, out_dir=str(tmp_path), budget_usd=1.0)
    lead = journal.instance_intent("a", provider="vast", offer_id=1, num_gpus=2,
                                   dph_total=0.5, seats=2)
    journal.instance_created(lead, 42)
    return journal, lead, journal.open_seat(lead, "b", 1)


def test_two_seats_leaving_at_once_leave_exactly_one_destroy(tmp_path: Path) -> None:
    journal, lead, seat = two_seats(tmp_path)
    with pytest.raises(ValueError, match="taken"):
        journal.open_seat(lead, "c", 1)
    with pytest.raises(ValueError, match="no seat"):
        journal.open_seat(lead, "c", 2)
    assert journal.leave_seat(lead) == "left"
    assert journal.get_instance(lead)["state"] == "left"
    assert journal.leave_seat(seat) == "destroy"
    # the last seat is claimed for the destroy in the same transaction: no seat opens on it now
    assert journal.get_instance(seat)["state"] == "destroying"
    with pytest.raises(ValueError, match="not a live instance"):
        journal.open_seat(seat, "c", 1)


def test_a_seat_whose_bundle_is_not_home_keeps_the_machine(tmp_path: Path) -> None:
    journal, lead, seat = two_seats(tmp_path)
    assert journal.leave_seat(lead, keep=True) == "left"  # b trains on: nothing is stopped
    assert journal.get_instance(lead)["state"] == "stopped"
    assert journal.leave_seat(seat) == "stop"  # the last one stops it: a's bundle is on it
    assert journal.get_instance(seat)["state"] == "left"


@pytest.mark.ssh
@pytest.mark.slow
def test_sigkill_right_after_a_seat_opens_then_resume_rents_nothing_more(
        tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    use_sshd_key(sshd)
    offer = add_two_gpu_offer(fake_vast, per_gpu=0.6)
    path = batch_file(vast_spec(tmp_path, name="ks", steps=4), {
        "max_usd": 20, "max_parallel": 1, "sweep": {"training.lr": [1e-3, 2e-3]}})
    killed = controller("launch", path, "--yes", "--json", "--out", tmp_path / "out",
                        "--poll-interval", "0.2", env={"FLUX_REMOTE_FAULT": "after:seat_open"})
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    journal = open_journal()
    [batch] = journal.list_batches()
    first, second = journal.runs_of_batch(batch["batch_id"])
    [seat] = journal.instances(second["run_id"])  # killed right after its seat's transaction
    assert second["state"] == "planned" and seat_of(seat) == {"seat": 1, "seats": 2}

    final = controller("resume", batch["batch_id"], "--yes", "--json", "--poll-interval", "0.2")
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert json.loads(final.stdout)["state"] == "done"
    runs = journal.runs_of_batch(batch["batch_id"])
    assert [r["state"] for r in runs] == ["done", "done"]
    # the seat's run was reattached to the seat it was given: one instance, destroyed once
    assert [c["path"] for c in fake_vast.calls("PUT", "/api/v0/asks/")] == \
        [f"/api/v0/asks/{offer['id']}/"]
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1
    assert fake_vast.instances == {} and journal.pending_intents() == []
    assert [r["id"] for r in journal.instances(second["run_id"])] == [seat["id"]]
    # the idle seats were counted by the process that resumed (rebuilt from the journal)
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    [machine] = summary["machines"]
    assert machine["idle_usd"] > 0
    ledger = summary["ledger"]["runs"]
    assert ledger[S.idle_key(first["run_id"])]["spent_usd"] == pytest.approx(
        machine["idle_usd"], abs=1e-5)


def test_a_seat_that_ignored_stop_stops_the_whole_instance_and_it_stays_stopped(
        fake_vast: Any) -> None:
    """`_stop_from_home` on a seat: the instance is stopped through the API (the machine is not
    trusted to stop that run's training), the other seat's run is never handed it back, and the
    last seat to leave keeps it stopped for the ignoring run's `fetch`."""
    from controller.errors import ProviderError
    from controller.journal import untrusted_machine
    from controller.providers.vast import VastProvider
    from controller.vast.client import VastClient
    from tests.test_launch_vast_e2e import NO_WAIT

    client = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                        min_intervals=NO_WAIT, sleep=lambda s: None)
    provider = VastProvider(client, sleep=lambda s: None)
    journal = open_journal()
    for run_id in ("rogue", "honest"):
        journal.create_run(run_id=run_id, name=run_id, provider="vast", state="running",
                           spec={}, out_dir="/nonexistent", budget_usd=1.0)
    iid = client.create_instance(int(fake_vast.offers[0]["id"]), image="img", disk_gb=10,
                                 label="flux-remote:rogue")
    lead = journal.instance_intent("rogue", provider="vast", num_gpus=2, dph_total=0.3, seats=2)
    journal.instance_created(lead, iid)
    seat = journal.open_seat(lead, "honest", 1)

    provider.stop_machine("rogue", journal)
    assert fake_vast.instances[iid]["actual_status"] == "exited"
    assert journal.get_instance(lead)["state"] == "stopped" and untrusted_machine(journal, iid)
    starts = len([c for c in fake_vast.calls("PUT", f"/api/v0/instances/{iid}/")
                  if (c["json"] or {}).get("state") == "running"])
    with pytest.raises(ProviderError, match="ignored the cost cap's STOP"):
        provider.reattach("honest", None, journal)  # type: ignore[arg-type]
    assert len([c for c in fake_vast.calls("PUT", f"/api/v0/instances/{iid}/")
                if (c["json"] or {}).get("state") == "running"]) == starts  # never started
    provider.release("honest", journal)  # the honest run leaves: the rogue's data is kept
    assert journal.get_instance(seat)["state"] == "left" and iid in fake_vast.instances
    assert fake_vast.instances[iid]["actual_status"] == "exited"
    provider.release("rogue", journal)  # `down rogue` later: now it is destroyed
    assert iid not in fake_vast.instances and journal.pending_intents() == []
