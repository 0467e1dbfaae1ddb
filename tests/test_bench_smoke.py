"""The benchmarks in bench/ still import and their cheapest pure parts still work (no timings)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from controller.planning.planner import estimate

BENCH = Path(__file__).resolve().parents[1] / "bench"
MODULES = ["bench_cli_startup", "bench_ingest", "bench_sync", "bench_planner",
           "make_market_snapshot", "bench_controller", "controller_child", "bench_gpu",
           "run_all", "bench_estimate"]


def load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports_and_has_main(name: str) -> None:
    module = load(name)
    assert callable(module.main)
    assert module.__doc__ and module.__doc__.strip()


def test_planner_simulation_prices_picks_from_the_truth() -> None:
    load("make_market_snapshot")
    sim = load("market_sim")
    bench = load("bench_planner")
    market = sim.draw_market(random.Random(1), count=60)
    assert len(market.offers) == 60 and set(market.truth) == {o["id"] for o in market.offers}
    run = bench.one_run({}, market.offers, market, random.Random(2))
    assert run is not None and run["best"] > 0
    for name in bench.STRATEGIES:
        assert run[name]["spent"] <= run["budget"] + 1e-9
    summary = bench.summarise([run], 0.15)
    assert summary["runs"] == 1 and "p90" in summary["estimate_error"]
    # The truth, not the estimate: a slower true GPU costs more than the planner believed.
    offer = market.offers[0]
    est = estimate(bench.make_spec({}), offer)
    truth = market.truth[offer["id"]]
    slow = sim.Truth(truth.s_per_step * 2, truth.down_mbps, truth.overhead_factor, None)
    fast = sim.Truth(truth.s_per_step, truth.down_mbps, truth.overhead_factor, None)
    assert sim.realised_usd(est, slow) > sim.realised_usd(est, fast)
    assert sim.percentile([3.0, 1.0, 2.0], 90) == 3.0


def test_estimate_vs_bill_reads_both_figures_from_the_receipt() -> None:
    load("make_market_snapshot")
    sim = load("market_sim")
    bench = load("bench_estimate")
    rng = random.Random(3)
    template = load("make_market_snapshot")._templates()[0]
    offer = bench.offer_for(rng, template, "RTX 4090", 1)
    spec = load("bench_planner").make_spec({})
    truth = sim.draw_truth(rng, offer)
    exact = sim.Truth(3.0, 1e9, 1.0, None)  # the prior, an endless link: close to the estimate
    assert bench.with_failure(truth, "slow_gpu", offer, rng).s_per_step > 3.5  # past the range
    slow = bench.one_run(spec, offer, sim.Truth(6.0, 1e9, 1.0, None))  # twice the prior
    died = bench.one_run(spec, offer, sim.Truth(3.0, 1e9, 1.0, 0.9))
    near = bench.one_run(spec, offer, exact)
    assert slow["ratio"] > 1.2 and not slow["within"]  # a miss is reported as one
    assert died["ratio"] > near["ratio"]
    assert 0.5 < near["ratio"] < 1.2
    assert bench.summarise([slow, near])["runs"] == 2


def test_vast_default_order_score_fits_the_real_offers() -> None:
    sim = load("market_sim")
    ref = BENCH.parent / "tests" / "data" / "reference" / "vast"
    for name in ("search_offers_ondemand.json", "search_offers_bid.json"):
        for offer in json.loads((ref / name).read_text())["offers"]:
            assert 0.6 < sim.vast_score(offer) / offer["score"] < 1.4


def test_controller_helpers() -> None:
    child = load("controller_child")
    assert child.proc_status_kib("VmHWM", "Name:\tx\nVmHWM:\t  61234 kB\n") == 61234
    assert child.proc_status_kib("VmRSS", "Name:\tx\n") is None
    assert child.main([]) == 2  # it only runs with the benchmark's config file
    bench = load("bench_controller")
    assert bench.endpoint_kind("GET", "/api/v0/instances/123/") == "show"
    assert bench.endpoint_kind("DELETE", "/api/v0/instances/123/") == "destroy"
    assert bench.endpoint_kind("POST", "/api/v0/instances/123/ssh/") == "other"
    assert bench.endpoint_kind("PUT", "/api/v0/asks/9/") == "create"
    assert bench.endpoint_kind("GET", "/api/v1/instances/") == "list"
    requests = [{"method": "GET", "path": "/api/v0/instances/1/", "t": t} for t in (1.0, 2.0, 9.0)]
    rate = bench.per_hour(requests, 0.0, 3.6)
    assert rate["calls"] == 2 and rate["per_hour"] == 2000.0 and rate["by_kind"] == {"show": 2}
    limits = bench.limits_per_hour()
    assert limits["show"] == 1800.0 and limits["list"] == 3600.0


def test_gpu_helpers(tmp_path: Path) -> None:
    bench = load("bench_gpu")
    bar = "demo:  10%|#         | 20/200 [00:02<00:18,  9.80it/s, lr: 1.0e-04 loss: 4.2e-01]"
    assert bench.steps_per_s(bar) == pytest.approx(9.8)
    assert bench.steps_per_s("x: 5/9 [00:02<00:18,  2.00s/it]") == pytest.approx(0.5)
    assert bench.steps_per_s("no bar") is None
    from remote.trainers.config import load_config

    job = bench.tiny_job(tmp_path, tmp_path / "data", device="cpu", steps=7, batch=2)
    cfg = load_config(job)
    assert (cfg.device, cfg.steps, cfg.batch_size, cfg.sampling) == ("cpu", 7, 2, False)


def test_run_all_summaries_and_table() -> None:
    run_all = load("run_all")
    assert set(run_all.SUMMARIES) == set(run_all.BENCHES)
    rows = run_all.summarize("ingest", {"n": 10, "ratio": 3.0, "agent_images_per_s": 30.0,
                                        "naive_images_per_s": 10.0})
    assert rows == [("ingest", "agent / naive loop (same JPEG output), 10 images",
                     "3.00x (30.0 vs 10.0 img/s)", ">= 2x", True)]
    broken = run_all.summarize("sync", {"first_upload": {}})
    assert broken[0][2].startswith("unreadable")
    table = run_all.format_table(rows + broken)
    assert "benchmark" in table.splitlines()[0] and "yes" in table
    info = run_all.machine_info()
    assert info["nproc"] >= 1 and info["python"]


def test_run_all_writes_the_doc_table_it_printed_misses_included(tmp_path: Path) -> None:
    run_all = load("run_all")
    slow = run_all.summarize("ingest", {"n": 10, "ratio": 1.5, "agent_images_per_s": 15.0,
                                        "naive_images_per_s": 10.0})
    assert slow[0][4] is False and "MISSED" in run_all.format_table(slow)
    info = {**run_all.machine_info(), "loadavg_after": [1.0, 1.0, 1.0]}
    out = {"machine": info, "quick": False, "table": [
        dict(zip(("benchmark", "measure", "value", "target", "met"), r)) for r in slow],
        "benchmarks": {"ingest": {"rc": 0}, "sync": {"rc": 1}}}
    doc = tmp_path / "performance.md"
    doc.write_text(f"# P\n\nbefore\n{run_all.BEGIN}\nold numbers\n{run_all.END}\nafter\n")
    run_all.write_doc(out, "python bench/run_all.py --write-doc", doc, tmp_path / "p.json")
    text = doc.read_text()
    assert "old numbers" not in text and "before" in text and "after" in text
    assert "| 1.50x (15.0 vs 10.0 img/s) | >= 2x | **MISSED** |" in text
    assert "sync (exit code 1)" in text
    assert json.loads((tmp_path / "p.json").read_text())["table"][0]["met"] is False
