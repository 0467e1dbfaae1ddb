"""The batch schedule ``flux-remote plan BATCH.yaml`` shows (``controller.planning.schedule``):
the scheduler's rule simulated on the planner's own estimates, and its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from controller.errors import EXIT_BUDGET
from controller.planning.planner import plan_offers
from controller.planning.reuse import warm_estimate
from controller.planning.schedule import ScheduleItem, schedule_batch
from controller.providers.base import Estimate
from tests.fakevast import FakeVast
from tests.test_plan_cli import write_offers, write_spec
from tests.test_planner import make_spec, offer

runner = CliRunner()
# Two machines of the template's GPU (the batch's offer claims keep two machines off one offer);
# a short run on a 200 Mb/s link: the setup is most of a cold run, as for a short sweep.
OFFERS = [offer(1, dph_total=0.4, inet_down=200), offer(2, dph_total=0.5, inet_down=200)]


def item(name: str, **sections: Any) -> ScheduleItem:
    sections.setdefault("training", {"steps": 100})
    sections.setdefault("gpu", {"verified_only": False})
    spec = make_spec(name=name, **sections)
    plan = plan_offers(spec, OFFERS)
    chosen = plan.require_chosen()
    return ScheduleItem(name, spec, Estimate("vast", chosen.dph_total, chosen.est_usd,
                                             chosen.est_hours, chosen.gpu_name, plan=plan))


def sweep(n: int) -> list[ScheduleItem]:
    return [item(f"r{i}", training={"steps": 100, "lr": 1e-4 * (i + 1)}) for i in range(n)]


def placement(schedule: Any) -> list[list[str]]:
    return [m.runs for m in schedule.machines]


def test_six_runs_two_at_once_share_two_machines() -> None:
    items = sweep(6)
    schedule = schedule_batch(items, max_parallel=2, budget_usd=100.0)
    assert placement(schedule) == [["r0", "r2", "r4"], ["r1", "r3", "r5"]]
    assert [m.offer_id for m in schedule.machines] == [1, 2]  # never two machines on one offer
    assert [(r.machine, r.order, r.start) for r in schedule.runs] == [
        (0, 1, "cold"), (1, 1, "cold"), (0, 2, "warm"), (1, 2, "warm"), (0, 3, "warm"),
        (1, 3, "warm")]
    cold = items[0].estimate
    warm = warm_estimate(cold)
    first = schedule.runs[0]
    assert first.est_usd == pytest.approx(cold.est_usd)
    assert schedule.runs[2].est_usd == pytest.approx(warm.est_usd)
    assert schedule.runs[2].start_h == pytest.approx(first.end_h)  # handed over when r0 ends
    assert schedule.machines[0].setup_usd > 0
    per_run = schedule.per_run
    assert per_run is not None and per_run.setups == 6 and schedule.setups == 2
    data = schedule.to_dict()
    assert data["setups_saved"] == 4 and data["fits"] is True and data["skipped"] == []
    assert schedule.total_usd == pytest.approx(sum(r.est_usd for r in schedule.runs))
    assert schedule.saving_usd == pytest.approx(per_run.total_usd - schedule.total_usd)
    assert schedule.saving_usd > 0
    assert schedule.machine_hours < per_run.machine_hours
    assert schedule.to_dict() == schedule_batch(items, max_parallel=2, budget_usd=100.0).to_dict()


def test_a_tight_budget_runs_the_batch_on_one_machine() -> None:
    items = sweep(6)
    cold, margin = items[0].estimate.est_usd, items[0].spec.budget.safety_margin
    warm = warm_estimate(items[0].estimate).est_usd
    # Enough for one cold run and five warm ones, never for a second machine's cold reservation
    # next to the first machine's reservation.
    low, high = cold + 4 * warm + warm * (1 + margin), cold * (2 + margin) + warm * (1 + margin)
    assert low < high
    schedule = schedule_batch(items, max_parallel=2, budget_usd=(low + high) / 2)
    assert placement(schedule) == [["r0", "r1", "r2", "r3", "r4", "r5"]]
    assert schedule.fits and schedule.total_usd <= schedule.budget_usd
    assert schedule.to_dict()["setups_saved"] == 5


def test_a_second_machine_that_would_cost_runs_is_not_started() -> None:
    """Room for two cold reservations, but not for the other runs warm after the second setup:
    the batch stays on one machine and finishes every run (it used to start two and skip)."""
    items = sweep(6)
    margin = items[0].spec.budget.safety_margin
    cold = items[0].estimate.est_usd * (1 + margin)
    warm = warm_estimate(items[0].estimate).est_usd * (1 + margin)
    budget = 2 * cold + 3 * warm  # two machines fit; the 4 other runs warm do not
    schedule = schedule_batch(items, max_parallel=2, budget_usd=budget)
    assert placement(schedule) == [["r0", "r1", "r2", "r3", "r4", "r5"]]
    assert schedule.fits and not schedule.skipped


def test_reuse_off_rents_one_machine_per_run() -> None:
    schedule = schedule_batch(sweep(6), max_parallel=2, budget_usd=100.0, reuse=False)
    assert placement(schedule) == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"], ["r5"]]
    assert {r.start for r in schedule.runs} == {"cold"}
    assert schedule.saving_usd == pytest.approx(0.0)
    assert schedule.to_dict()["setups_saved"] == 0
    ends = sorted(m.end_h for m in schedule.machines)
    starts = sorted(m.start_h for m in schedule.machines)
    assert starts[2] == pytest.approx(ends[0])  # never more than two alive at once


def test_runs_with_other_machine_keys_get_their_own_machine() -> None:
    gpus = [{"verified_only": False, "disk_gb": 120}, {"verified_only": False, "disk_gb": 100}]
    items = [item(f"r{i}", gpu=gpus[i % 2]) for i in range(4)]
    schedule = schedule_batch(items, max_parallel=1, budget_usd=100.0)
    # r0's machine goes to r2 (the first pending run with its key), then r1 and r3 get one.
    assert placement(schedule) == [["r0", "r2"], ["r1", "r3"]]
    assert schedule.machines[1].start_h == pytest.approx(schedule.machines[0].end_h)


def test_a_run_that_never_fits_is_skipped_with_why() -> None:
    spec = make_spec(name="nothing")
    items = [*sweep(2), ScheduleItem("nothing", spec, error="no Vast.ai offer can finish it")]
    cold = items[0].estimate.est_usd
    schedule = schedule_batch(items, max_parallel=2, budget_usd=cold)  # margin: never fits
    assert placement(schedule) == []
    assert [r.name for r in schedule.skipped] == ["r0", "r1", "nothing"]
    assert "needs $" in schedule.runs[0].skipped
    assert "no Vast.ai offer can finish it" in schedule.runs[2].skipped
    assert not schedule.fits and "3 of 3 runs" in schedule.refusal()


def write_batch(tmp_path: Path, max_usd: float, runs: int = 6) -> Path:
    lrs = ", ".join(f"{1e-4 * (i + 1):.0e}" for i in range(runs))
    return write_spec(tmp_path, extra=f"batch: {{max_usd: {max_usd}, max_parallel: 2, "
                                      f"sweep: {{training.lr: [{lrs}]}}}}\n")


def test_plan_batch_json_shows_the_schedule(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(write_batch(tmp_path, 60.0)), "--offers",
                                 str(write_offers(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["fits"] is True and data["budget_usd"] == 60.0
    assert [len(m["runs"]) for m in data["machines"]] == [3, 3]
    assert data["setups"] == 2 and data["one_instance_per_run"]["setups"] == 6
    assert data["setups_saved"] == 4 and data["saving_usd"] > 0
    assert data["total_usd"] == pytest.approx(sum(r["est_usd"] for r in data["runs"]), abs=1e-3)
    assert data["total_usd"] <= 60.0


def test_plan_batch_table_and_budget_exit(tmp_path: Path) -> None:
    offers = str(write_offers(tmp_path))
    result = runner.invoke(app, ["plan", str(write_batch(tmp_path, 60.0)), "--offers", offers])
    assert result.exit_code == 0, result.output
    assert "setup paid once per machine (2)" in result.output
    assert "one instance per run" in result.output and "Nothing was rented" in result.output
    result = runner.invoke(app, ["plan", str(write_batch(tmp_path, 0.2)), "--offers", offers,
                                 "--json"])
    assert result.exit_code == EXIT_BUDGET, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"] == "BudgetError"
    assert "do not fit the batch budget $0.20" in data["message"]


def test_plan_batch_searches_vast_once_per_query(tmp_path: Path, fake_vast: FakeVast) -> None:
    result = runner.invoke(app, ["plan", str(write_batch(tmp_path, 60.0)), "--json"])
    assert result.exit_code == 0, result.output
    assert len(fake_vast.calls("POST", "/api/v0/bundles/")) == 1  # six runs, one query
    assert json.loads(result.stdout)["setups"] == 2
    assert not fake_vast.calls("PUT") and not fake_vast.instances
