"""The batch scheduler end to end: FakeVast + a real sshd for the sweep, the local provider with
the tiny trainer for budget, failure isolation and retries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.batch.scheduler import BatchOptions, BatchScheduler
from controller.batch.setup import create_batch
from controller.errors import ProviderError
from controller.run.fetch import verify_sums
from controller.journal import open_journal
from controller.providers.local import LocalProvider
from controller.spec.loader import load_file
from tests.test_launch_local import write_spec
from tests.test_launch_vast_e2e import vast_provider, vast_spec

FAST = BatchOptions(poll_interval=0.1, tick_s=0.05, finish_allowance_s=5.0)


def batch_file(spec_path: Path, batch: dict[str, Any]) -> Path:
    """Turn a single-run spec file into a batch file (the spec becomes the base)."""
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["batch"] = batch
    path = spec_path.with_name(f"batch-{spec_path.name}")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def add_twin_offers(fake: Any, copies: int) -> None:
    """More offers like the reference one that fits the tiny spec, each a little dearer."""
    base = list(fake.offers)
    for k in range(1, copies + 1):
        fake.offers.extend({**o, "id": int(o["id"]) + 1000 * k,
                            "dph_total": float(o["dph_total"]) * (1 + 0.05 * k)} for o in base)


def max_alive(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    alive = peak = 0
    for _, delta in edges:
        alive += delta
        peak = max(peak, alive)
    return peak


@pytest.mark.ssh
@pytest.mark.slow
def test_a_sweep_of_four_runs_two_instances_at_a_time(tmp_path: Path, fake_vast: Any,
                                                       sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    add_twin_offers(fake_vast, 5)
    path = batch_file(vast_spec(tmp_path, name="sw", steps=4), {
        "max_usd": 20, "max_parallel": 2,
        "sweep": {"training.lr": [1e-3, 2e-3], "training.rank": [2, 4]}})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")

    def factory(name: str, claims: Any) -> Any:
        assert name == "vast"
        return vast_provider(fake_vast, sshd, offer_claims=claims,
                             measured_s_per_step=journal.measured_s_per_step())

    result = BatchScheduler(journal, batch_id, provider_factory=factory, options=FAST).run()

    assert result.state == "done", json.dumps(result.rows, indent=1, default=str)
    runs = journal.runs_of_batch(batch_id)
    assert len(runs) == 4 and all(r["state"] == "done" for r in runs), json.dumps(
        [{k: r.get(k) for k in ("name", "state", "error")} for r in runs], indent=1)
    for run in runs:
        assert verify_sums(Path(run["bundle_path"])) >= 3
        assert Path(run["bundle_path"]).parent == tmp_path / "out"
        assert "  loss.jsonl\n" in (Path(run["bundle_path"]) / "SHA256SUMS").read_text()
    # two machines, each set up once and handed from its first run to the next
    # (batch.reuse_machines, on by default); every one destroyed at the end
    rows = [i for r in runs for i in journal.instances(r["run_id"])]
    machines = {i["instance_id"] for i in rows}
    assert len(rows) == 4 and len(machines) == 2 and len({i["offer_id"] for i in rows}) == 2
    assert sorted(i["state"] for i in rows) == ["destroyed", "destroyed", "handed_over",
                                                 "handed_over"]
    spans = [(min(i["intent_at"] for i in rows if i["instance_id"] == m),
              max(i["destroyed_at"] for i in rows if i["instance_id"] == m)) for m in machines]
    assert max_alive(spans) == 2
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 2 and fake_vast.instances == {}
    for machine in machines:  # each run billed from when it took the machine to when it let go
        chain = journal.machine_rows(machine)
        assert chain[1]["billing_started_at"] == chain[0]["destroyed_at"]
        assert json.loads(chain[1]["detail"])["from_run"] == chain[0]["run_id"]
        [took] = journal.events(chain[1]["run_id"], "handover_in")
        # the next run is past its setup within a minute of taking the machine: nothing to set
        # up again (a short run's train stage can fall between two polls)
        past = [e["at"] for e in journal.events(chain[1]["run_id"], "agent_stage")
                if e["detail"]["stage"] not in ("checks", "bootstrap")]
        assert past and past[0] - took["at"] < 60
        # the instance carries the run it now serves (vast-cli `label instance`)
        labels = [c["json"]["label"] for c in fake_vast.calls("PUT", f"/api/v0/instances/{machine}/")
                  if "label" in (c["json"] or {})]
        assert labels == [f"flux-remote:{chain[1]['run_id']}"]
    # measured s/step of the first finished runs fed the plan of the later ones
    assert "RTX 5090" in journal.measured_s_per_step()
    sources = [json.dumps(journal.events(r["run_id"], "estimate")[0]["detail"]) for r in runs]
    assert "measured on your runs" not in sources[0]
    assert any("measured on your runs" in s for s in sources[2:])
    # the ledger: every run reserved against the total, and the spend stays under it
    spent = sum(r["spend_usd"] for r in runs)
    assert 0 < spent <= 20 and result.ledger["committed_usd"] == pytest.approx(spent, abs=1e-5)
    for run in runs:
        [reserve] = journal.events(run["run_id"], "ledger_reserve")
        assert run["budget_usd"] == pytest.approx(reserve["detail"]["reserved_usd"])

    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert summary["varied"] == ["training.lr", "training.rank"]
    assert summary["spent_usd"] <= summary["budget_usd"]
    # the split: each machine's setup paid once, carried in equal shares by its two runs; the
    # shares add up to what was metered
    assert summary["reuse_machines"] is True and len(summary["machines"]) == 2
    for machine in summary["machines"]:
        assert len(machine["runs"]) == 2 and machine["setup_s"] > 0
        assert machine["setup_usd"] > 0 and machine["setup_share_usd"] == pytest.approx(
            machine["setup_usd"] / 2, abs=1e-6)
    assert sum(e["share_usd"] for e in summary["runs"]) == pytest.approx(
        sum(e["usd"] for e in summary["runs"]), abs=1e-4)
    for entry in summary["runs"]:
        receipt = json.loads((Path(entry["bundle"]) / "controller_receipt.json").read_text())
        assert receipt["machine_share"]["share_usd"] == entry["share_usd"]
        assert receipt["machine_share"]["setup_share_usd"] > 0
    for entry in summary["runs"]:
        assert entry["result"] == "done" and entry["bundle"] and entry["usd"] > 0
        assert entry["hours"] > 0 and entry["final_loss"] is not None and entry["s_per_step"]
        assert set(entry["params"]) == {"training.lr", "training.rank"}
    report = (tmp_path / "out" / "batch_report.html").read_text()
    assert report.count('<path d="M') == 4 and report.count("<img ") == 4
    assert 'src="http' not in report and "rank=4" in report
    assert report.count("<h2>Machines</h2>") == 1  # each machine with the runs it served


def test_the_report_takes_the_loss_curve_from_the_bundle_and_else_from_the_log(
        tmp_path: Path) -> None:
    from controller.batch.report import run_entry

    bar = "r:  {p}%|#   | {s}/4 [00:01<00:01,  1.00s/it, lr: 1.0e-04 loss: {v}]\n"
    for name in ("new", "old"):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "agent.log").write_text(
            bar.format(p=25, s=1, v="9.0e-01") + bar.format(p=50, s=2, v="8.0e-01"))
    (tmp_path / "new" / "loss.jsonl").write_text(  # step 2 again after a resume: the last wins
        '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.45}\n{"step": 2, "loss": 0.4}\n')
    rows = {name: {"name": name, "slot_state": "done", "out_dir": str(tmp_path / name),
                   "bundle_path": str(tmp_path / name)} for name in ("new", "old")}
    new, old = run_entry(rows["new"]), run_entry(rows["old"])  # "old": packed before loss.jsonl
    assert new["loss_points"] == [(1, 0.5), (2, 0.4)] and new["final_loss"] == 0.4
    assert old["loss_points"] == [(1, 0.9), (2, 0.8)] and old["final_loss"] == 0.8


class FlakyLocal(LocalProvider):
    """The local provider, except that the first machine for run ``flaky_name`` never comes."""

    failed: set[str] = set()

    def __init__(self, flaky_name: str) -> None:
        super().__init__()
        self.flaky_name = flaky_name

    def acquire(self, run_id: str, spec: Any, estimate: Any, journal: Any, notify: Any) -> Any:
        if spec.name == self.flaky_name and spec.name not in FlakyLocal.failed:
            FlakyLocal.failed.add(spec.name)
            raise ProviderError("the host never answered")
        return super().acquire(run_id, spec, estimate, journal, notify)


@pytest.mark.slow
def test_budget_skips_failures_stay_isolated_and_infra_failures_are_retried(
        tmp_path: Path) -> None:
    spec = write_spec(tmp_path, name="mix", steps=4, budget=0.5,
                      provider={"type": "local", "price_per_hour": 3.6})
    path = batch_file(spec, {"max_usd": 2.0, "max_parallel": 3, "runs": [
        {"name": "mix-ok"},
        {"name": "mix-gate", "quality_gate.min_images": 500},  # fails its gate: no retry
        {"name": "mix-flaky"},  # its first machine never comes: retried once
        {"name": "mix-big", "budget.max_usd": 5.0},  # can never fit the 2.0 total
    ]})
    journal = open_journal()
    batch_id = create_batch(journal, load_file(path), out_dir=tmp_path / "out")
    FlakyLocal.failed = set()
    result = BatchScheduler(journal, batch_id, options=FAST,
                            provider_factory=lambda name, claims: FlakyLocal("mix-flaky")).run()

    slots = {row["name"]: row for row in result.rows}
    assert result.state == "partial"
    assert slots["mix-ok"]["slot_state"] == "done"
    assert slots["mix-gate"]["slot_state"] == "failed" and slots["mix-gate"]["attempts"] == 1
    assert "quality_gate" in slots["mix-gate"]["note"]
    assert slots["mix-flaky"]["slot_state"] == "done" and slots["mix-flaky"]["attempts"] == 2
    assert slots["mix-big"]["slot_state"] == "skipped"
    assert slots["mix-big"]["note"].startswith("skipped: budget") and not slots["mix-big"]["run_id"]
    runs = journal.runs_of_batch(batch_id)
    assert sorted(r["name"] for r in runs) == ["mix-flaky", "mix-flaky", "mix-gate", "mix-ok"]
    spent = sum(r["spend_usd"] for r in runs)
    assert 0 < spent <= 2.0
    assert all(r["budget_usd"] <= 0.5 for r in runs)  # each run capped at its reservation
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["mix-big"]["result"].startswith("skipped: budget")
    assert by_name["mix-gate"]["result"] == "failed" and by_name["mix-gate"]["error"]
    assert summary["spent_usd"] <= 2.0
    assert summary["varied"] == ["quality_gate.min_images", "budget.max_usd"]
