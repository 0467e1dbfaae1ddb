"""``flux-remote plan``: table, --json arithmetic, exit codes, live search on FakeVast."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from controller.cli.main import app
from controller.cli.plan_cmds import render_plan
from controller.planning.planner import plan_offers
from controller.vast.client import MIN_INTERVALS
from tests.fakevast import FakeVast, reference_offers
from tests.test_planner import make_spec, offer

runner = CliRunner()


def write_spec(tmp_path: Path, max_usd: float = 20.0, extra: str = "") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for n in range(5):
        Image.new("RGB", (64, 64), (n * 40, 0, 0)).save(data / f"img{n}.png")
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "name: cli-test\n"
        f"dataset: {{path: {data}}}\n"
        "gpu: {verified_only: false, min_ram_gb: 30, disk_gb: 50}\n"
        f"budget: {{max_usd: {max_usd}}}\n" + extra,
        encoding="utf-8",
    )
    return spec


def write_offers(tmp_path: Path) -> Path:
    path = tmp_path / "offers.json"
    path.write_text(json.dumps({"offers": reference_offers()}), encoding="utf-8")
    return path


def test_plan_json_from_saved_offers(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path)), "--offers",
                                 str(write_offers(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["chosen"]["offer_id"] == data["offers"][0]["offer_id"]
    costs = [o["est_usd"] for o in data["offers"]]
    assert costs == sorted(costs)
    for o in data["offers"]:
        for key in ("offer_id", "gpu_name", "num_gpus", "dph_total", "est_hours", "est_usd",
                    "inet_down", "reliability", "location", "why"):
            assert key in o
        b = o["breakdown"]
        assert o["est_usd"] == pytest.approx(b["compute_usd"] + b["bandwidth_usd"], abs=0.002)
    assert data["excluded"] == {"cuda": 1}  # the V100 host's CUDA 12.2 < 12.4
    assert data["budget_usd"] == 20.0


def test_plan_table_marks_the_chosen_offer(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path)), "--offers",
                                 str(write_offers(tmp_path)), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert "chosen: offer 52216381" in result.output
    assert "Nothing was rented" in result.output
    assert "50821030" not in result.output  # --top 2


def test_render_plan_wide_console_has_why_column() -> None:
    res = plan_offers(make_spec(), [offer(1, dph_total=0.4), offer(2, dph_total=0.5)])
    buf = io.StringIO()
    render_plan(res, Console(file=buf, width=140), top=5)
    text = buf.getvalue()
    assert "why" in text and "cheapest run" in text and "+$" in text


def test_plan_refuses_with_exit_3_when_nothing_fits(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, max_usd=0.2)
    offers = write_offers(tmp_path)
    result = runner.invoke(app, ["plan", str(spec), "--offers", str(offers)])
    assert result.exit_code == 3
    assert "cheapest estimate is $" in result.output and "budget $0.20" in result.output
    as_json = runner.invoke(app, ["plan", str(spec), "--offers", str(offers), "--json"])
    assert as_json.exit_code == 3
    data = json.loads(as_json.stdout)
    assert data["ok"] is False and data["error"] == "BudgetError"
    assert data["chosen"] is None and data["excluded"]["budget"] == 4


def test_bad_offers_file_and_bad_spec_exit_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert runner.invoke(app, ["plan", str(spec), "--offers", str(bad)]).exit_code == 2
    bad.write_text('{"offers": 3}', encoding="utf-8")
    assert runner.invoke(app, ["plan", str(spec), "--offers", str(bad)]).exit_code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nbudget: {max_usd: -1}\n", encoding="utf-8")
    assert runner.invoke(app, ["plan", str(broken), "--offers", str(bad)]).exit_code == 2


def test_plan_searches_vast_and_rents_nothing(tmp_path: Path, fake_vast: FakeVast) -> None:
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    searches = fake_vast.calls("POST", "/api/v0/bundles/")
    assert len(searches) == 1
    assert searches[0]["json"]["type"] == "on-demand"
    assert searches[0]["json"]["allocated_storage"] == 50.0
    assert data["chosen"]["offer_id"] == 52216381
    assert not fake_vast.calls("PUT") and not fake_vast.instances


def test_plan_with_interruptible_searches_bids_too(tmp_path: Path, fake_vast: FakeVast,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MIN_INTERVALS, "search", 0.0)  # the CLI's client would wait 6 s
    spec = write_spec(tmp_path).read_text().replace("disk_gb: 50}", "disk_gb: 50, "
                                                    "interruptible: true}")
    (tmp_path / "run.yaml").write_text(spec)
    result = runner.invoke(app, ["plan", str(tmp_path / "run.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    types = [r["json"]["type"] for r in fake_vast.calls("POST", "/api/v0/bundles/")]
    assert types == ["on-demand", "bid"]
    assert any(o["interruptible"] for o in json.loads(result.stdout)["offers"])


def test_live_plan_without_key_says_how_to_set_one(tmp_path: Path, fake_vast: FakeVast,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path))])
    assert result.exit_code == 2
    assert "VAST_API_KEY" in result.output


def test_plan_uses_speeds_measured_in_the_journal(tmp_path: Path) -> None:
    from controller.journal import open_journal

    journal = open_journal()
    journal.record_s_per_step("A100 PCIE", 1.1, run_id="r1")
    journal.close()
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path)), "--offers",
                                 str(write_offers(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["chosen"]
    assert chosen["gpu_name"] == "A100 PCIE"
    assert chosen["breakdown"]["s_per_step"] == 1.1
    assert chosen["breakdown"]["s_per_step_source"] == "measured on your runs"
