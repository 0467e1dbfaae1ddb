"""The benchmarks in bench/ still import and their cheapest pure parts still work (no timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
MODULES = ["bench_cli_startup", "bench_ingest", "bench_sync", "bench_planner",
           "make_market_snapshot", "bench_controller", "controller_child", "bench_gpu",
           "run_all"]


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


def test_planner_compare_on_the_saved_snapshot() -> None:
    bench = load("bench_planner")
    offers = json.loads((BENCH / "market_snapshot.json").read_text())["offers"]
    assert len(offers) >= 50
    result = bench.compare(bench.make_spec({}), offers)
    assert result["eligible"] >= 1
    assert result["planner"]["est_usd"] > 0
    assert result["ratio_vs_lowest_dph"] > 0 and result["ratio_vs_api_score"] > 0


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
    assert rows == [("ingest", "agent / naive loop, 10 images", "3.00x (30.0 vs 10.0 img/s)",
                     ">= 2x", True)]
    broken = run_all.summarize("sync", {"first_upload": {}})
    assert broken[0][2].startswith("unreadable")
    table = run_all.format_table(rows + broken)
    assert "benchmark" in table.splitlines()[0] and "yes" in table
    info = run_all.machine_info()
    assert info["nproc"] >= 1 and info["python"]
