"""The batch ledger, failure classification, offer claims and the batch tables (fast, no runs)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from controller.batch.scheduler import classify_failure
from controller.errors import BudgetError, ProviderError, RunError, SpecError, TransportError
from controller.run.follow import MachineLost
from controller.journal import open_journal
from controller.batch.ledger import FINISH_HOLD_S, Ledger, reservation_for, run_reservation
from controller.providers.vast import OfferClaims, VastProvider
from controller.run.states import ACTIVE_STATES


def test_reservation_is_the_estimate_with_margin_capped_by_the_run_budget() -> None:
    assert reservation_for(1.0, 5.0, margin=0.2) == pytest.approx(1.2)
    assert reservation_for(4.5, 5.0, margin=0.2) == 5.0
    assert reservation_for(None, 3.0) == 3.0  # cannot estimate: the whole run budget
    assert reservation_for(0.0, 3.0) == 0.0  # free hardware


def test_a_run_reserves_what_the_controller_cap_holds_back_for_its_finish(
        tmp_path: Path) -> None:
    """A run whose estimate comes true must not be stopped by its own cap: the cap writes STOP
    once the spend plus ``FINISH_ALLOWANCE_S`` of the machine reaches the run's budget (its
    reservation), so the reservation carries that much on top of estimate and margin."""
    from controller.providers.base import Estimate
    from controller.run.follow import FINISH_ALLOWANCE_S
    from controller.spec.loader import load_spec
    from tests.test_launch_local import write_spec

    assert FINISH_HOLD_S == FINISH_ALLOWANCE_S
    spec = load_spec(write_spec(tmp_path, name="hold", budget=5.0))
    estimate = Estimate(provider="vast", price_per_hour=0.6, est_usd=0.1, est_hours=0.2)
    held = 0.6 * FINISH_ALLOWANCE_S / 3600
    assert run_reservation(estimate, spec) == pytest.approx(
        0.1 * (1 + spec.budget.safety_margin) + held)
    # the cap's first STOP comes only after the estimate is spent
    assert run_reservation(estimate, spec) - held >= estimate.est_usd
    assert reservation_for(1.0, 1.1, margin=0.2, hold_usd=0.1) == 1.1  # still the run's budget


def test_reserve_meter_close_release() -> None:
    ledger = Ledger(10.0)
    assert ledger.try_reserve("a", 4.0) and ledger.try_reserve("b", 4.0)
    assert not ledger.try_reserve("c", 4.0)  # only 2 left
    assert ledger.entry("c") is None
    ledger.meter("a", 1.5)
    assert ledger.committed() == pytest.approx(8.0)  # a still holds its reservation
    ledger.meter("a", 1.0)  # spend only grows
    assert ledger.entry("a").spent == 1.5
    released = ledger.close("a", 2.0)
    assert released == pytest.approx(2.0)
    assert ledger.committed() == pytest.approx(6.0) and ledger.spent() == pytest.approx(2.0)
    assert ledger.try_reserve("c", 4.0) and not ledger.fits(0.01)
    assert ledger.close("a") == 0.0  # closing twice releases nothing
    ledger.rename("c", "run-c")
    assert ledger.entry("run-c") is not None and ledger.entry("c") is None
    ledger.cancel("run-c")
    assert ledger.remaining() == pytest.approx(4.0)
    data = ledger.to_dict()
    assert data["total_usd"] == 10.0 and set(data["runs"]) == {"a", "b"}


def test_an_overshooting_run_counts_its_spend() -> None:
    ledger = Ledger(5.0)
    assert ledger.try_reserve("a", 2.0)
    ledger.meter("a", 2.5)
    assert ledger.committed() == pytest.approx(2.5)
    assert not ledger.try_reserve("b", 2.6) and ledger.try_reserve("b", 2.5)


def test_concurrent_reservations_never_pass_the_total() -> None:
    ledger = Ledger(10.0)
    won: list[str] = []
    barrier = threading.Barrier(16)

    def grab(key: str) -> None:
        barrier.wait()
        if ledger.try_reserve(key, 3.0):
            won.append(key)

    threads = [threading.Thread(target=grab, args=(f"k{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 3 and ledger.committed() <= 10.0


def test_the_ledger_is_rebuilt_from_the_journaled_runs() -> None:
    runs = [{"run_id": "a", "state": "running", "budget_usd": 3.0, "spend_usd": 1.0},
            {"run_id": "b", "state": "done", "budget_usd": 3.0, "spend_usd": 2.0},
            {"run_id": "c", "state": "fetching", "budget_usd": 3.0, "spend_usd": 3.5},
            {"run_id": "d", "state": "renting", "budget_usd": 3.0, "spend_usd": 0.0}]
    ledger = Ledger.from_runs(20.0, runs, active_states=ACTIVE_STATES, reservations={"d": 1.0})
    assert ledger.committed() == pytest.approx(3.0 + 2.0 + 3.5 + 1.0)
    assert ledger.spent() == pytest.approx(6.5)
    assert ledger.entry("b").open is False


@pytest.mark.parametrize(("error", "exc", "kind"), [
    ("quality gate failed: 3 images (cause: quality_gate)", None, "run"),
    ("runtime checks failed: gpu (cause: checks)", None, "infra"),
    ("No space left (cause: disk_full)", None, "infra"),
    ("trainer exited 1 (cause: trainer)", None, "run"),
    ("the agent is gone without an exit code", None, "infra"),
    (None, ProviderError("no offer became ready"), "infra"),
    (None, TransportError("ssh refused"), "infra"),
    (None, MachineLost("outbid"), "infra"),
    (None, SpecError("bad"), "run"),
    (None, BudgetError("too dear"), "run"),
    (None, RunError("lost contact"), "run"),
])
def test_only_infrastructure_failures_are_retried(error: str | None, exc: Exception | None,
                                                  kind: str) -> None:
    assert classify_failure({"error": error} if error else None, exc) == kind


def test_offer_claims_are_exclusive_across_threads() -> None:
    claims = OfferClaims()
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        if claims.claim(123):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1 and 123 in claims and "123" in claims and 124 not in claims
    claims.release(123)
    assert 123 not in claims and claims.claim(123)


def test_runs_sharing_claims_plan_different_offers(tmp_path: Path, fake_vast: Any) -> None:
    from controller.spec.loader import load_spec
    from controller.vast.client import VastClient
    from tests.test_launch_vast_e2e import NO_WAIT, vast_spec

    fake_vast.offers.extend({**o, "id": int(o["id"]) + 1000, "dph_total": float(o["dph_total"])
                             * 1.1} for o in list(fake_vast.offers))
    spec = load_spec(vast_spec(tmp_path))
    client = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                        min_intervals=NO_WAIT, sleep=lambda s: None)
    claims = OfferClaims()
    first = VastProvider(client, offer_claims=claims).estimate(spec)
    claims.claim(first.plan.chosen.offer_id)
    second = VastProvider(client, offer_claims=claims).estimate(spec)
    assert second.plan.chosen.offer_id != first.plan.chosen.offer_id
    assert second.est_usd >= first.est_usd
    provider = VastProvider(client, offer_claims=claims)
    assert all(o.offer_id != first.plan.chosen.offer_id
               for o in provider._candidates(spec, first))


def test_batch_tables_migrate_and_round_trip(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3")
    assert "m003_batches" in journal.applied_migrations()
    journal.create_batch(batch_id="sw-batch-1", name="sw", spec_path=None, out_dir=str(tmp_path),
                         max_usd=9.0, max_parallel=2, retries=1, margin=0.0, varied=["a.b"],
                         items=[{"idx": 0, "name": "sw-1", "label": "x", "params": {"a.b": 1},
                                 "spec": {"name": "sw-1"}}])
    journal.update_batch_run("sw-batch-1", 0, state="skipped", note="skipped: budget")
    journal.update_batch("sw-batch-1", state="partial")
    assert journal.find_batches("sw-b")[0]["state"] == "partial"
    assert journal.find_batches("sw-batch-1%") == []
    [slot] = journal.batch_runs("sw-batch-1")
    assert slot["state"] == "skipped" and slot["note"] == "skipped: budget"
    with pytest.raises(ValueError):
        journal.update_batch_run("sw-batch-1", 0, bogus=1)
    journal.close()
    again = open_journal(tmp_path / "j.sqlite3")  # an existing file is not migrated twice
    assert again.applied_migrations().count("m003_batches") == 1


def test_the_purse_grants_a_run_more_only_from_what_the_batch_has_left(tmp_path: Path) -> None:
    """``LedgerPurse`` (what a run whose lost machine needs more asks): the run's reservation
    grows and is journaled (``resume`` rebuilds it), never past the batch's total."""
    from types import SimpleNamespace

    from controller.batch.scheduler import LedgerPurse
    from controller.journal import Journal

    journal = Journal(tmp_path / "j.sqlite3")
    journal.create_run(run_id="r1", name="r1", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path), budget_usd=2.0)
    ledger = Ledger(10.0)
    assert ledger.try_reserve("r1", 2.0) and ledger.try_reserve("r2", 5.0)
    purse = LedgerPurse(SimpleNamespace(ledger=ledger, journal=journal, batch_id="b",
                                        _lock=threading.RLock()))
    assert purse.available() == pytest.approx(3.0)
    assert purse.grant("r1", 2.5)
    assert ledger.entry("r1").reserved == pytest.approx(4.5)
    assert purse.available() == pytest.approx(0.5)
    assert not purse.grant("r1", 1.0) and ledger.entry("r1").reserved == pytest.approx(4.5)
    assert not purse.grant("nobody", 0.1)
    [event] = journal.events("r1", "ledger_reserve")
    assert event["detail"]["reserved_usd"] == pytest.approx(4.5)
