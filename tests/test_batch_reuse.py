"""A batch hands a finished run's machine to its next run (issue 17 part 2, ``batch.reuse_machines``).

Most cases drive the :class:`~controller.batch.scheduler.BatchScheduler` over scripted machines
(:class:`Fleet`: every rent is a new in-memory host whose agent outcome the test scripts), which
takes well under a second each. The crash case is the real CLI in a subprocess on the local
provider with the tiny trainer, SIGKILLed right after the handover's journal transaction. The
money split is checked on a journal built by hand, with known times.

Where the bill of a reused Vast instance is checked against FakeVast: tests/test_batch_scheduler.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from controller.batch.scheduler import BatchResult, BatchScheduler
from controller.batch.setup import create_batch
from controller.batch.shares import BOOT_DOWNLOAD, machine_split
from controller.batch.stop import BATCH_STOP, cancel_pending
from controller.journal import Journal, open_journal
from controller.providers.base import Machine, claim_own_machine, own_machine_row
from controller.run.relaunch import row_usd
from controller.spec.loader import load_file
from remote.status import STAGES
from remote.watchdog import RELEASED_MARKER
from tests.faults import controller
from tests.test_batch_scheduler import FAST, batch_file
from tests.test_launch_local import write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider

Script = Callable[[ScriptedHost, str], None]


def agent_fails(host: ScriptedHost, run_dir: str, cause: str) -> None:
    """The agent ends ``failed`` with ``cause`` and no bundle, as ``remote.runner._fail`` writes
    it: the stage that failed (``checks``, ``quality_gate``; a cause read from the trainer's log,
    such as ``disk_full``: ``train``), ``error`` and ``cause``, exit code 1 (``EXIT_FAILED``)."""
    stage = cause if cause in STAGES else "train"
    error = f"scripted {cause}"
    host.files[f"{run_dir}/agent.log"] = f"stage {stage} failed: {error}\n".encode()
    host.files[f"{run_dir}/status.json"] = json.dumps(
        {"state": "failed", "stage": stage, "error": error, "cause": cause, "step": None,
         "total": None, "stages": {stage: {"state": "failed",
                                           "detail": {"error": error, "cause": cause}}}}).encode()
    host.files[f"{run_dir}/agent.rc"] = b"1\n"
    host.alive.clear()


class FleetHost(ScriptedHost):
    """A scripted host that can run a callback when the controller downloads from it."""

    def __init__(self) -> None:
        super().__init__()
        self.on_download: Callable[[str], None] = lambda remote: None

    def download(self, remote: str, local: Path, *, includes: Any = None,
                 max_bytes: int | None = None) -> Any:
        self.on_download(remote)
        return super().download(remote, local, includes=includes, max_bytes=max_bytes)


class Fleet(ScriptedProvider):
    """A scripted provider where every ``acquire`` is a new machine: its own host and instance
    id (``m1``, ``m2``...), so the journal's machine chains can be told apart. ``script`` plays
    each run's agent; ``ran_on`` says which machine each run's agent was started on. Its rows
    are journaled as own hardware's are (``claim_own_machine``; handing over: the parent's
    ``hand_over``, as ``OwnMachineProvider.hand_over`` in controller/providers/base.py)."""

    def __init__(self, script: Script) -> None:
        super().__init__(ScriptedHost())
        self.script = script
        self.hosts: dict[str, FleetHost] = {}
        self.ran_on: dict[str, str] = {}  # run id -> instance id its agent started on

    def _machine(self, iid: str, row: int, started: float) -> Machine:
        return Machine(host=self.hosts[iid], root="/r", python="python3",
                       price_per_hour=self.price, billing_started_at=started, instance_row=row,
                       info={"gpu_name": "RTX 4090", "instance_id": iid})

    def acquire(self, run_id: str, spec: Any, estimate: Any, journal: Any,
                notify: Any) -> Machine:
        iid = f"m{len(self.hosts) + 1}"
        host = FleetHost()

        def on_start(h: ScriptedHost, run_dir: str) -> None:
            self.ran_on[run_dir.rsplit("/", 1)[-1]] = iid
            self.script(h, run_dir)

        host.on_start = on_start
        self.hosts[iid] = host
        row, started = claim_own_machine(journal, run_id, provider=self.name, name=iid,
                                         price_per_hour=self.price, clock=time.time)
        return self._machine(iid, row, started)

    def reattach(self, run_id: str, spec: Any, journal: Any) -> Machine:
        row, started = own_machine_row(journal, run_id)
        return self._machine(str(journal.get_instance(row)["instance_id"]), row, started)


def run_batch(tmp_path: Path, batch: dict[str, Any], script: Script, *,
              name: str = "rb") -> tuple[Journal, str, Fleet, BatchResult]:
    spec = write_spec(tmp_path, name=name, steps=2)
    journal = open_journal()
    batch_id = create_batch(journal, load_file(batch_file(spec, batch)), out_dir=tmp_path / "out")
    fleet = Fleet(script)
    result = BatchScheduler(journal, batch_id, options=FAST,
                            provider_factory=lambda kind, claims: fleet).run()
    return journal, batch_id, fleet, result


def by_name(journal: Journal, batch_id: str) -> dict[str, dict[str, Any]]:
    """The batch's runs by name (each slot ran once in these tests)."""
    runs = journal.runs_of_batch(batch_id)
    named = {r["name"]: r for r in runs}
    assert len(named) == len(runs), [r["name"] for r in runs]
    return named


def rows_of(journal: Journal, run_id: str) -> list[tuple[str, str]]:
    return [(str(i["instance_id"]), i["state"]) for i in journal.instances(run_id)]


def dump(result: BatchResult) -> str:
    return json.dumps(result.rows, indent=1, default=str)[:3000]


# ---- which runs hand their machine over -----------------------------------------------------

def test_a_run_that_failed_for_its_own_reason_hands_its_machine_to_the_next(
        tmp_path: Path) -> None:
    def script(host: ScriptedHost, run_dir: str) -> None:
        if "rb-gate" in run_dir:
            agent_fails(host, run_dir, "quality_gate")
        else:
            host.finish(run_dir, "done")

    journal, batch_id, fleet, result = run_batch(tmp_path, {
        "max_usd": 2.0, "max_parallel": 1, "runs": [{"name": "rb-gate"}, {"name": "rb-next"}]},
        script)

    slots = {row["name"]: row for row in result.rows}
    assert slots["rb-gate"]["slot_state"] == "failed" and slots["rb-gate"]["attempts"] == 1
    assert "quality_gate" in slots["rb-gate"]["note"]
    assert slots["rb-next"]["slot_state"] == "done", dump(result)
    runs = by_name(journal, batch_id)
    gate, nxt = runs["rb-gate"]["run_id"], runs["rb-next"]["run_id"]
    # one machine: rented once, its chain the failed run then the next one
    assert list(fleet.hosts) == ["m1"] and fleet.handed_over == [(gate, nxt)]
    assert fleet.ran_on == {gate: "m1", nxt: "m1"}
    chain = journal.machine_rows("m1")
    assert [(r["run_id"], r["state"]) for r in chain] == [(gate, "handed_over"),
                                                          (nxt, "destroyed")]
    assert json.loads(chain[1]["detail"])["from_run"] == gate
    assert chain[1]["billing_started_at"] == chain[0]["destroyed_at"]
    assert journal.events(nxt, "handover_in") and journal.events(gate, "handover_out")
    # the failed run told its lingering watchdog and cleared its directory for the next run
    host = fleet.hosts["m1"]
    assert f"/r/{gate}/{RELEASED_MARKER}" in host.files
    assert f"rm -rf -- /r/{gate}" in host.commands
    assert runs["rb-next"]["state"] == "done" and runs["rb-next"]["bundle_path"]


@pytest.mark.parametrize("cause", ["checks", "disk_full"])
def test_a_run_whose_machine_failed_it_does_not_hand_it_over(tmp_path: Path, cause: str) -> None:
    def script(host: ScriptedHost, run_dir: str) -> None:
        if "rb-bad" in run_dir:
            agent_fails(host, run_dir, cause)
        else:
            host.finish(run_dir, "done")

    journal, batch_id, fleet, result = run_batch(tmp_path, {
        "max_usd": 2.0, "max_parallel": 1, "retries": 0,
        "runs": [{"name": "rb-bad"}, {"name": "rb-next"}]}, script)

    slots = {row["name"]: row for row in result.rows}
    assert slots["rb-bad"]["slot_state"] == "failed" and f"(cause: {cause})" in \
        slots["rb-bad"]["note"]
    assert slots["rb-next"]["slot_state"] == "done", dump(result)
    runs = by_name(journal, batch_id)
    bad, nxt = runs["rb-bad"]["run_id"], runs["rb-next"]["run_id"]
    assert fleet.handed_over == []
    assert fleet.ran_on == {bad: "m1", nxt: "m2"}  # the next run rented a fresh machine
    assert rows_of(journal, bad) == [("m1", "destroyed")]
    assert rows_of(journal, nxt) == [("m2", "destroyed")]
    assert f"/r/{bad}/{RELEASED_MARKER}" not in fleet.hosts["m1"].files
    assert not journal.events(nxt, "handover_in")


@pytest.mark.parametrize("override", [{"gpu.image": "example/other-image:1"},
                                      {"base_model": "flux-schnell"}])
def test_runs_with_different_machine_keys_never_share_a_machine(tmp_path: Path,
                                                                override: dict[str, Any]) -> None:
    journal, batch_id, fleet, result = run_batch(tmp_path, {
        "max_usd": 2.0, "max_parallel": 1,
        "runs": [{"name": "rb-a"}, {"name": "rb-other", **override}, {"name": "rb-c"}]},
        lambda host, run_dir: host.finish(run_dir, "done"))

    assert result.state == "done", dump(result)
    runs = by_name(journal, batch_id)
    a, other, c = (runs[n]["run_id"] for n in ("rb-a", "rb-other", "rb-c"))
    # the first run's machine skips the run it cannot serve and goes to the next one that matches
    assert fleet.handed_over == [(a, c)]
    assert fleet.ran_on[a] == fleet.ran_on[c] != fleet.ran_on[other]
    assert [r["run_id"] for r in journal.machine_rows(fleet.ran_on[other])] == [other]
    assert rows_of(journal, other) == [(fleet.ran_on[other], "destroyed")]


def test_reuse_machines_false_gives_every_run_its_own_machine(tmp_path: Path) -> None:
    journal, batch_id, fleet, result = run_batch(tmp_path, {
        "max_usd": 2.0, "max_parallel": 1, "reuse_machines": False,
        "sweep": {"training.lr": [1e-3, 2e-3, 3e-3]}},
        lambda host, run_dir: host.finish(run_dir, "done"))

    assert result.state == "done", dump(result)
    runs = journal.runs_of_batch(batch_id)
    assert len(runs) == 3 and fleet.handed_over == [] and len(fleet.hosts) == 3
    assert sorted(fleet.ran_on.values()) == ["m1", "m2", "m3"]
    assert all(len(journal.instances(r["run_id"])) == 1 for r in runs)
    assert {i["state"] for i in journal.instances()} == {"destroyed"}
    assert not any(f"/r/{r['run_id']}/{RELEASED_MARKER}" in h.files
                   for r in runs for h in fleet.hosts.values())


@pytest.mark.parametrize("lands", ["whole", "request_only"])
def test_a_stop_while_a_run_finishes_destroys_its_machine_and_starts_nothing(
        tmp_path: Path, lands: str) -> None:
    """``stop BATCH`` lands while the first run brings its bundle home: its machine is not
    handed over (destroyed) and the pending slots never start. ``request_only``: the stop's
    first transaction (its request, ``batch_stop``) is in the journal, its cancel of the pending
    slots not yet: the request alone must keep the machine from the next slot."""
    spec = write_spec(tmp_path, name="rb", steps=2)
    journal = open_journal()
    batch_id = create_batch(journal, load_file(batch_file(spec, {
        "max_usd": 2.0, "max_parallel": 1, "sweep": {"training.lr": [1e-3, 2e-3, 3e-3]}})),
        out_dir=tmp_path / "out")
    note = "stopped by the user before it started"
    stops: list[int] = []

    def stop_now(remote: str) -> None:  # the bundle download of the orchestrator's _finish
        if stops:
            return
        if lands == "whole":
            stops.append(cancel_pending(journal, batch_id, note))
        else:  # as cancel_pending journals it, before it marks any slot
            journal.add_event(None, BATCH_STOP, {"batch_id": batch_id, "note": note})
            stops.append(0)

    def script(host: ScriptedHost, run_dir: str) -> None:
        host.finish(run_dir, "done")
        assert isinstance(host, FleetHost)
        host.on_download = stop_now

    fleet = Fleet(script)
    result = BatchScheduler(journal, batch_id, options=FAST,
                            provider_factory=lambda kind, claims: fleet).run()

    assert stops == [2 if lands == "whole" else 0]
    assert [r["slot_state"] for r in result.rows] == ["done", "stopped", "stopped"], dump(result)
    assert [r["note"] for r in result.rows[1:]] == [note, note]
    [run] = journal.runs_of_batch(batch_id)
    assert run["state"] == "done" and run["bundle_path"]
    assert fleet.handed_over == [] and list(fleet.hosts) == ["m1"]
    assert rows_of(journal, run["run_id"]) == [("m1", "destroyed")]
    assert result.state == "partial"


# ---- a controller killed right after the handover -------------------------------------------

@pytest.mark.slow
def test_sigkill_right_after_the_handover_then_resume_finishes_on_the_handed_machine(
        tmp_path: Path) -> None:
    # a priced local machine ($3.60/h): the money of a run killed mid-handover is checked too
    path = batch_file(write_spec(tmp_path, name="hk", steps=2, budget=1.5,
                                 provider={"type": "local", "price_per_hour": 3.6}),
                      {"max_usd": 4.0, "max_parallel": 1, "sweep": {"training.lr": [1e-3, 2e-3]}})
    out = tmp_path / "out"
    killed = controller("launch", path, "--yes", "--json", "--out", out, "--poll-interval", "0.1",
                        env={"FLUX_REMOTE_FAULT": "after:handover_in"})
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    journal = open_journal()
    [batch] = journal.list_batches()
    batch_id = batch["batch_id"]
    first, second = journal.runs_of_batch(batch_id)
    # killed between the handover's transaction and the next run's start
    assert first["state"] == "fetching" and second["state"] == "planned"
    assert [i["state"] for i in journal.instances(first["run_id"])] == ["handed_over"]
    [handed] = journal.instances(second["run_id"])
    assert handed["state"] == "live" and json.loads(handed["detail"])["from_run"] == \
        first["run_id"]
    assert [s["state"] for s in journal.batch_runs(batch_id)] == ["active", "active"]

    final = controller("resume", batch_id, "--yes", "--json", "--poll-interval", "0.1")
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert json.loads(final.stdout)["state"] == "done"
    runs = journal.runs_of_batch(batch_id)
    assert [r["run_id"] for r in runs] == [first["run_id"], second["run_id"]]
    assert all(r["state"] == "done" and r["bundle_path"] for r in runs), runs
    # the second run trained on the machine it was handed: no machine of its own
    [row] = journal.instances(second["run_id"])
    assert row["id"] == handed["id"] and row["state"] == "destroyed"
    assert [i["state"] for i in journal.instances(first["run_id"])] == ["handed_over"]
    assert [e["kind"] for e in journal.events(second["run_id"])].count("agent_started") == 1
    assert not journal.events(second["run_id"], "rent_intent")
    states = [e["detail"]["state"] for e in journal.events(second["run_id"], "state")]
    assert "renting" not in states and states[-1] == "done", states  # reattached, not rented
    assert not [i for i in journal.instances() if i["state"] not in ("destroyed", "handed_over")]
    assert journal.pending_intents() == []
    # The first run's money, as when nothing was killed: metered up to the handover (the end
    # of its handed-over row), a controller receipt with its share of the machine, and a split
    # in batch_summary.json that adds up to what the runs were metered.
    [gone] = journal.instances(first["run_id"])
    assert gone["destroyed_at"] == row["billing_started_at"]
    spent, billed = journal.get_run(first["run_id"])["spend_usd"], row_usd(gone, 0.0)
    summary = json.loads((out / "batch_summary.json").read_text())
    problems = []
    if spent != pytest.approx(billed, abs=1e-6):
        problems.append(f"{first['name']}: spend_usd {spent} but its machine row billed {billed} "
                        f"up to the handover")
    for run in runs:
        receipt = (Path(run["bundle_path"]) / "controller_receipt.json")
        if "machine_share" not in (json.loads(receipt.read_text()) if receipt.is_file() else {}):
            problems.append(f"{run['name']}: no controller receipt with its machine share")
    shares, metered = (sum(e["share_usd"] for e in summary["runs"]),
                       sum(e["usd"] for e in summary["runs"]))
    if shares != pytest.approx(metered, abs=1e-5):
        problems.append(f"batch_summary.json: the shares add up to {shares}, the runs' usd to "
                        f"{metered}")
    assert not problems, "\n".join(problems)


# ---- the money split ------------------------------------------------------------------------

def test_the_split_pays_the_setup_once_in_equal_shares_that_add_up(tmp_path: Path) -> None:
    """Two runs on one machine at $3.60/h: the first rents it at t=1000 and is past its setup
    (checks, bootstrap) at t=1400; it hands over at t=2000; the second lets go at t=2600."""
    now = [1000.0]
    journal = Journal(tmp_path / "j.sqlite3", clock=lambda: now[0])
    for run_id in ("ra", "rb"):
        journal.create_run(run_id=run_id, name=run_id, provider="vast", state="running",
                           spec={}, out_dir=str(tmp_path / run_id), budget_usd=5.0)

    row = journal.instance_intent("ra", provider="vast", offer_id=7, dph_total=3.6)
    journal.instance_created(row, 555, billing_started_at=1000.0)
    # the Vast provider's estimated boot download (controller/providers/vast.py)
    journal.add_event("ra", "transfer", {"direction": "down", "estimated": True,
                                         "what": BOOT_DOWNLOAD, "usd": 0.05})
    for at, kind, detail in ((1100.0, "agent_started", {"pid": 1}),
                             (1200.0, "agent_stage", {"stage": "checks"}),
                             (1300.0, "agent_stage", {"stage": "bootstrap"}),
                             (1400.0, "agent_stage", {"stage": "train"}),
                             (1900.0, "transfer", {"direction": "down", "usd": 0.02}),
                             (2100.0, "agent_stage", {"stage": "train"}),
                             (2150.0, "transfer", {"direction": "up", "usd": 0.01})):
        now[0] = at
        journal.add_event("ra" if at < 2000 else "rb", kind, detail)
    now[0] = 2000.0
    new_row = journal.hand_over_instance(row, "rb")
    now[0] = 2600.0
    journal.destroy_intent(new_row)
    journal.instance_destroyed(new_row)

    machines, per_run = machine_split(journal, ["ra", "rb"], now=9999.0)

    [machine] = machines
    assert machine["instance_id"] == "555" and machine["runs"] == ["ra", "rb"]
    assert machine["setup_s"] == 400.0  # rented at 1000, past bootstrap at 1400
    setup = 400 / 3600 * 3.6 + 0.05  # its time and the boot download, paid once
    assert machine["setup_usd"] == pytest.approx(setup)
    assert machine["setup_share_usd"] == pytest.approx(setup / 2)
    assert machine["hours"] == pytest.approx(1600 / 3600)
    ra, rb = per_run["ra"], per_run["rb"]
    assert ra["metered_usd"] == pytest.approx(1000 / 3600 * 3.6 + 0.05 + 0.02)
    assert rb["metered_usd"] == pytest.approx(600 / 3600 * 3.6 + 0.01)
    assert ra["setup_share_usd"] == rb["setup_share_usd"] == pytest.approx(setup / 2)
    assert ra["own_usd"] == pytest.approx(600 / 3600 * 3.6 + 0.02)  # after its setup
    assert rb["own_usd"] == pytest.approx(600 / 3600 * 3.6 + 0.01)  # all its own
    for entry in (ra, rb):
        assert entry["share_usd"] == pytest.approx(entry["own_usd"] + entry["setup_share_usd"])
        assert entry["machines"] == ["555"]
    assert ra["share_usd"] + rb["share_usd"] == pytest.approx(
        ra["metered_usd"] + rb["metered_usd"], abs=1e-6)
    assert ra["share_usd"] < ra["metered_usd"] and rb["share_usd"] > rb["metered_usd"]


def test_own_hardware_machines_are_told_apart_by_their_handovers(tmp_path: Path) -> None:
    """``local`` journals every machine as "localhost": two lanes of a batch (max_parallel 2) are
    two machines of two runs each, not one chain of four."""
    now = [0.0]
    journal = Journal(tmp_path / "j.sqlite3", clock=lambda: now[0])
    for run_id in ("a1", "b1", "a2", "b2"):
        journal.create_run(run_id=run_id, name=run_id, provider="local", state="running",
                           spec={}, out_dir=str(tmp_path / run_id), budget_usd=5.0)
    rows = {}
    for run_id in ("a1", "b1"):
        rows[run_id] = journal.instance_intent(run_id, provider="local", dph_total=1.0)
        journal.instance_created(rows[run_id], "localhost", billing_started_at=0.0)
    now[0] = 100.0
    rows["b2"] = journal.hand_over_instance(rows["b1"], "b2")
    now[0] = 150.0
    rows["a2"] = journal.hand_over_instance(rows["a1"], "a2")

    machines, _ = machine_split(journal, ["a1", "b1", "a2", "b2"], now=200.0)

    assert sorted(m["runs"] for m in machines) == [["a1", "a2"], ["b1", "b2"]]
    assert len({m["instance_id"] for m in machines}) == 2
