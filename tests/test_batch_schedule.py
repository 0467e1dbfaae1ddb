"""The batch schedule ``flux-remote plan BATCH.yaml`` shows (``controller.planning.schedule``):
the scheduler's rule simulated on the planner's own estimates, and its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.batch.ledger import run_reservation
from controller.cli.main import app
from controller.errors import EXIT_BUDGET
from controller.planning.packing import choose_pack, pack_spec
from controller.planning.planner import plan_offers
from controller.planning.reuse import machine_key, setup_part, warm_estimate
from controller.planning.schedule import ScheduleItem, schedule_batch
from controller.providers.base import Estimate
from tests.fakevast import FakeVast, reference_offers
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
    # Six runs, one query for a machine each, one for each machine size they may share
    # (gpus_per_machine 4 by default: 2 and 4 GPUs).
    searches = fake_vast.calls("POST", "/api/v0/bundles/")
    assert sorted(call["json"]["num_gpus"]["eq"] for call in searches) == [1, 2, 4]
    assert json.loads(result.stdout)["setups"] == 2
    assert not fake_vast.calls("PUT") and not fake_vast.instances


# ---- several runs at once on one multi-GPU machine (controller.planning.packing) ----------------

# Long enough runs that a seat's share of the setup matters less than the training: a 2-GPU
# machine at $0.50/h (a GPU for $0.25/h) is then cheaper per run than the $0.40/h single one;
# at $0.90/h it is dearer. Made-up offers on the template, as OFFERS.
PACK_STEPS = 3000
CHEAP_PAIR, DEAR_PAIR = 0.5, 0.9


def packed_sweep(n: int, pair_dph: float) -> list[ScheduleItem]:
    """``n`` runs of one machine key, each with its estimate on a 2-GPU offer at ``pair_dph``
    (as ``schedule.with_packs`` gives them)."""
    offers = [*OFFERS, offer(3, num_gpus=2, dph_total=pair_dph, inet_down=200, cpu_ram=256000)]
    items = []
    for i in range(n):
        spec = make_spec(name=f"r{i}", training={"steps": PACK_STEPS, "lr": 1e-4 * (i + 1)},
                         gpu={"verified_only": False})
        single, pair = plan_offers(spec, offers), plan_offers(pack_spec(spec, 2), offers)
        items.append(ScheduleItem(f"r{i}", spec, Estimate.from_plan(single),
                                  packs={2: Estimate.from_plan(pair)}))
    assert len({machine_key(item.spec) for item in items}) == 1
    return items


def the_pack(items: list[ScheduleItem]) -> Any:
    pack = choose_pack(items[0].estimate, items[0].packs)
    assert pack is not None and pack.seats == 2
    return pack


def reserve(items: list[ScheduleItem]) -> Any:
    spec = items[0].spec
    return lambda e: run_reservation(e, spec)


def test_a_cheaper_two_gpu_offer_runs_two_runs_on_one_machine() -> None:
    items = packed_sweep(2, CHEAP_PAIR)
    pack = the_pack(items)
    # Room for two machines, but r1 waits for the seat the pack promised it.
    schedule = schedule_batch(items, max_parallel=2, budget_usd=100.0, gpus_per_machine=4)
    assert placement(schedule) == [["r0", "r1"]]
    machine = schedule.machines[0]
    assert (machine.offer_id, machine.num_gpus, machine.seats) == (3, 2, 2)
    assert machine.dph_total == pytest.approx(CHEAP_PAIR)
    first, second = schedule.runs
    assert [(r.machine, r.seat, r.start) for r in schedule.runs] == [(0, 0, "cold"),
                                                                      (0, 1, "warm")]
    setup_h = setup_part(pack.machine)[0] / 3600
    assert setup_h > 0
    assert second.start_h == pytest.approx(setup_h)  # warm, once the first run set it up
    assert first.est_usd == pytest.approx(pack.lead.est_usd)
    assert second.est_usd == pytest.approx(pack.warm.est_usd)
    assert first.reserved_usd == pytest.approx(reserve(items)(pack.lead))
    assert second.reserved_usd == pytest.approx(reserve(items)(pack.warm))
    per_run = schedule.per_run
    assert per_run is not None and per_run.setups == 2 and schedule.saving_usd > 0
    data = schedule.to_dict()
    assert data["gpus_per_machine"] == 4
    assert (data["machines"][0]["num_gpus"], data["machines"][0]["seats"]) == (2, 2)
    assert [r["seat"] for r in data["runs"]] == [0, 1]


def test_the_idle_seats_are_counted_in_the_total() -> None:
    items = packed_sweep(2, CHEAP_PAIR)
    pack = the_pack(items)
    schedule = schedule_batch(items, max_parallel=1, budget_usd=100.0, gpus_per_machine=2)
    assert placement(schedule) == [["r0", "r1"]]
    machine = schedule.machines[0]
    # Both runs end together; seat 1 was empty while the first run set the machine up.
    assert schedule.runs[0].end_h == pytest.approx(schedule.runs[1].end_h)
    idle = setup_part(pack.machine)[0] / 3600 * CHEAP_PAIR / 2
    assert idle > 0.1 and machine.idle_usd == pytest.approx(idle)
    runs = sum(r.est_usd for r in schedule.runs)
    assert machine.est_usd == pytest.approx(runs + idle)
    assert schedule.total_usd == pytest.approx(runs + idle)
    assert schedule.to_dict()["idle_usd"] == pytest.approx(idle, abs=1e-4)
    # A third run takes one seat when the first two end; the other seat is idle till it ends.
    schedule = schedule_batch(packed_sweep(3, CHEAP_PAIR), max_parallel=1, budget_usd=100.0,
                              gpus_per_machine=2)
    assert placement(schedule) == [["r0", "r1", "r2"]]
    machine, r2 = schedule.machines[0], schedule.runs[2]
    assert r2.start_h == pytest.approx(schedule.runs[0].end_h) and machine.end_h == r2.end_h
    tail = (r2.end_h - r2.start_h) * CHEAP_PAIR / 2
    assert machine.idle_usd == pytest.approx(idle + tail)
    assert schedule.total_usd == pytest.approx(sum(r.est_usd for r in schedule.runs) + idle + tail)


def test_a_dearer_two_gpu_offer_is_not_packed() -> None:
    items = packed_sweep(2, DEAR_PAIR)
    assert choose_pack(items[0].estimate, items[0].packs) is None
    schedule = schedule_batch(items, max_parallel=2, budget_usd=100.0, gpus_per_machine=4)
    assert placement(schedule) == [["r0"], ["r1"]]
    assert {(m.offer_id, m.num_gpus, m.seats) for m in schedule.machines} == {(1, 1, 1),
                                                                              (2, 1, 1)}
    assert schedule.idle_usd == 0


@pytest.mark.parametrize("gpus_per_machine, reuse", [(1, True), (4, False)])
def test_packing_needs_gpus_per_machine_and_reuse(gpus_per_machine: int, reuse: bool) -> None:
    items = packed_sweep(2, CHEAP_PAIR)
    the_pack(items)
    schedule = schedule_batch(items, max_parallel=1, budget_usd=100.0, reuse=reuse,
                              gpus_per_machine=gpus_per_machine)
    assert placement(schedule) == ([["r0", "r1"]] if reuse else [["r0"], ["r1"]])
    assert {m.num_gpus for m in schedule.machines} == {1}
    r0, r1 = schedule.runs
    assert r1.start_h == pytest.approx(r0.end_h)  # one after the other


def test_a_budget_without_room_for_the_whole_pack_runs_single() -> None:
    items = packed_sweep(2, CHEAP_PAIR)
    pack = the_pack(items)
    single = reserve(items)(items[0].estimate)
    whole = pack.total_reserve(reserve(items))
    # A single run and the pack's first seat with its idle fit; its second seat does not.
    budget = (max(single, reserve(items)(pack.lead) + pack.idle_usd) + whole) / 2
    assert budget < whole
    schedule = schedule_batch(items, max_parallel=1, budget_usd=budget, gpus_per_machine=2)
    assert placement(schedule) == [["r0"]]
    assert schedule.machines[0].num_gpus == 1 and schedule.runs[0].seat == 0
    assert [r.name for r in schedule.skipped] == ["r1"]


def test_max_parallel_counts_machines_and_seats_are_handed_on() -> None:
    items = packed_sweep(4, CHEAP_PAIR)
    pack = the_pack(items)
    schedule = schedule_batch(items, max_parallel=1, budget_usd=100.0, gpus_per_machine=2)
    assert placement(schedule) == [["r0", "r1", "r2", "r3"]]  # one machine, two runs at once
    r0, r1, r2, r3 = schedule.runs
    assert r1.start_h < r0.end_h
    assert [(r.seat, r.start) for r in (r0, r1)] == [(0, "cold"), (1, "warm")]
    # Both seats' runs end together (up to rounding): each seat goes to the next run, warm.
    assert {r2.seat, r3.seat} == {0, 1} and {r2.start, r3.start} == {"warm"}
    assert r2.start_h == pytest.approx(r0.end_h) and r3.start_h == pytest.approx(r1.end_h)
    assert r2.est_usd == pytest.approx(pack.warm.est_usd)
    assert schedule.machines[0].end_h == pytest.approx(max(r2.end_h, r3.end_h))


def write_pair_offers(tmp_path: Path, dph_total: float) -> Path:
    """The reference offers plus a 2-GPU machine made from the cheapest fitting one (the A100
    host): its GPUs are the same, at ``dph_total`` for both."""
    offers = reference_offers()
    a100 = next(o for o in offers if o["gpu_name"] == "A100 PCIE")
    offers.append({**a100, "id": 1, "ask_contract_id": 1, "num_gpus": 2,
                   "dph_total": dph_total})
    path = tmp_path / "offers.json"
    path.write_text(json.dumps({"offers": offers}), encoding="utf-8")
    return path


def test_plan_batch_shows_two_runs_on_a_two_gpu_offer(tmp_path: Path) -> None:
    batch = write_spec(tmp_path, extra="training: {steps: 3000}\n"
                                       "batch: {max_usd: 20, max_parallel: 1, "
                                       "sweep: {training.lr: [1e-4, 2e-4]}}\n")
    offers = str(write_pair_offers(tmp_path, 0.22))
    result = runner.invoke(app, ["plan", str(batch), "--offers", offers, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["gpus_per_machine"] == 4 and data["fits"] is True
    [machine] = data["machines"]
    assert (machine["offer_id"], machine["num_gpus"], machine["seats"]) == (1, 2, 2)
    assert [(r["machine"], r["seat"], r["start"]) for r in data["runs"]] == [(0, 0, "cold"),
                                                                              (0, 1, "warm")]
    assert machine["idle_usd"] > 0 and data["idle_usd"] == machine["idle_usd"]
    assert data["total_usd"] == pytest.approx(sum(r["est_usd"] for r in data["runs"])
                                              + data["idle_usd"], abs=1e-3)
    assert data["one_instance_per_run"]["setups"] == 2 and data["saving_usd"] > 0
    result = runner.invoke(app, ["plan", str(batch), "--offers", offers],
                           env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    assert "2x A100 PCIE" in result.output and "seat 2" in result.output
    assert "idle seats" in result.output
