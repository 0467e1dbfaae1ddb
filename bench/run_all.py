"""Run every benchmark, collect their JSON into bench/results/all.json, print one table.

Each benchmark is its own script (runnable alone) and writes ``bench/results/<name>.json``;
this runs them one after the other as subprocesses, then reads those files back. ``--quick``
shrinks every size (for a smoke run, not for the numbers in docs/performance.md).

    python bench/run_all.py [--quick | --quick-for ingest gpu] [--only ingest sync ...]
                            [--skip gpu] [--baseline-venv /tmp/vastai-venv]

The table has one row per measured ratio or overhead with its target and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, results file, full-size args, quick args)
BENCHES: dict[str, tuple[str, str, list[str], list[str]]] = {
    "cli_startup": ("bench_cli_startup.py", "cli_startup.json", ["--repeat", "10"],
                    ["--repeat", "3"]),
    "ingest": ("bench_ingest.py", "ingest.json", ["--n", "200"], ["--n", "40"]),
    "sync": ("bench_sync.py", "sync.json", ["--mb", "100", "--repeats", "5"],
             ["--mb", "20", "--repeats", "1"]),
    "planner": ("bench_planner.py", "planner.json", [], []),
    "controller": ("bench_controller.py", "controller.json", [], ["--quick"]),
    "gpu": ("bench_gpu.py", "gpu.json", [], ["--quick"]),
}

Row = tuple[str, str, str, str, "bool | None"]  # benchmark, measure, value, target, met


def machine_info() -> dict[str, Any]:
    """What docs/performance.md records about the machine the numbers come from."""
    cpu = platform.processor()
    mem_kib = 0
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
        mem_kib = next((int(line.split()[1]) for line in
                        Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemTotal:")), 0)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kib / 1024 ** 2, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---- one summary per benchmark (pure: JSON in, rows out) -------------------------------------

def _cli(d: dict[str, Any]) -> list[Row]:
    res = d["results"]
    rows: list[Row] = []
    for name in ("flux-remote --help", "flux-remote ls"):
        r = res.get(name)
        if r is None:
            continue
        ratio = r.get("ratio_to_vastai_help")
        value = f"{ratio:.2f}x ({r['median_s']:.2f} s, {r['max_rss_mib']:.0f} MiB)" if ratio \
            else f"{r['median_s']:.2f} s (no vastai baseline)"
        rows.append(("cli_startup", f"{name} / vastai --help", value, "< 0.5x",
                     ratio < 0.5 if ratio else None))
    return rows


def _ingest(d: dict[str, Any]) -> list[Row]:
    return [("ingest", f"agent / naive loop, {d['n']} images",
             f"{d['ratio']:.2f}x ({d['agent_images_per_s']:.1f} vs {d['naive_images_per_s']:.1f} "
             f"img/s)", ">= 2x", d["ratio"] >= 2.0)]


def _sync(d: dict[str, Any]) -> list[Row]:
    first, again, cut = d["first_upload"], d["unchanged_reupload"], d["interrupted_resume"]
    mb = d["dataset_bytes"] / 1e6
    return [
        ("sync", f"first upload {mb:.0f} MB / rsync -a", f"{first['throughput_ratio']:.2f}x",
         ">= 0.9x", first["throughput_ratio"] >= 0.9),
        ("sync", "re-upload, nothing changed", f"{again['fraction'] * 100:.3f} % sent", "< 1 %",
         again["fraction"] < 0.01),
        ("sync", "resume after a cut", f"{cut['fraction'] * 100:.1f} % sent", "< 60 %",
         cut["fraction"] < 0.6),
    ]


def _planner(d: dict[str, Any]) -> list[Row]:
    return [
        ("planner", f"planner $ / lowest-$/h $ (mean, {d['offers']} offers)",
         f"{d['mean_ratio_vs_lowest_dph']:.3f}", "<= 1", d["mean_ratio_vs_lowest_dph"] <= 1.0),
        ("planner", "planner $ / API-score pick $ (mean)", f"{d['mean_ratio_vs_api_score']:.3f}",
         "<= 1", d["mean_ratio_vs_api_score"] <= 1.0),
    ]


def _controller(d: dict[str, Any]) -> list[Row]:
    s = d["single"]
    start = s["start"]
    median = " (median)" if "median_s" in start else ""
    rows: list[Row] = [("controller", "launch -> agent started" + median,
                        f"{start.get('median_s', start['launch_to_agent_started_s']):.2f} s",
                        "< 5 s", start["met"])]
    destroy = s.get("destroy")
    if destroy:
        rows.append(("controller", "last step -> destroy request" + median,
                     f"{destroy.get('median_s', destroy['last_step_to_destroy_request_s']):.2f} s",
                     f"< 10 s + fetch {destroy['fetch_s']:.2f} s", destroy["met"]))
    api = s["follow_api"]
    healthy = api.get("healthy", api)
    show_limit = d["limits_per_hour"]["show"]
    rows.append(("controller", "Vast API calls / instance-hour following",
                 f"{healthy['per_hour']:.0f}", f"<< {show_limit:.0f} (show)",
                 healthy["per_hour"] < show_limit / 2))
    rows.append(("controller", "controller RSS following 1 run",
                 f"{s['rss']['follow_max_mib']:.0f} MiB", "", None))
    c = d.get("concurrent")
    if c:
        rows.append(("controller", f"RSS following {c['runs']} runs (sum of processes)",
                     f"{c['rss_follow_max_mib_total']:.0f} MiB", "", None))
    b = d.get("batch")
    if b and "skipped" not in b:
        rows.append(("controller", f"RSS following a {b['runs']}-run batch (one process)",
                     f"{b['rss_max_mib']:.0f} MiB", "", None))
    return rows


def _gpu(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if not d.get("cuda"):
        rows.append(("gpu", "CUDA parts", "skipped: no CUDA here", "", None))
    for name, run in d["tiny_trainer"]["runs"].items():
        ratio = run.get("cuda_over_cpu")
        cpu = run["cpu"].get("steps_per_s")
        rows.append(("gpu", f"tiny trainer {name}: CUDA / CPU steps/s",
                     f"{ratio:.2f}x" if ratio else f"cpu {cpu} steps/s", "", None))
    ing = d["ingest"]
    rows.append(("gpu", f"ingest on {ing['workers']} workers / 1 worker",
                 f"{ing['all_over_one']:.2f}x ({ing['all_cores_images_per_s']:.1f} img/s)", "",
                 None))
    return rows


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "cli_startup": _cli, "ingest": _ingest, "sync": _sync, "planner": _planner,
    "controller": _controller, "gpu": _gpu,
}


def summarize(name: str, data: dict[str, Any]) -> list[Row]:
    """The table rows of one benchmark's JSON (a row saying so when the JSON is not usable)."""
    try:
        return SUMMARIES[name](data)
    except (KeyError, TypeError, ValueError) as exc:
        return [(name, "results", f"unreadable ({type(exc).__name__}: {exc})", "", None)]


def format_table(rows: list[Row]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [("benchmark", "measure", "value", "target",
                                                   None)]) for i in range(4)]
    head = ("benchmark", "measure", "value", "target", "met")
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths + [3]))]
    for row in rows:
        met = "" if row[4] is None else ("yes" if row[4] else "NO")
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + met)
    return "\n".join(lines)


def run_one(name: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    script, _, full, small = BENCHES[name]
    argv = [sys.executable, str(HERE / script), *(small if quick else full), *extra]
    print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=HERE.parent)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
            "argv": argv[1:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere")
    parser.add_argument("--quick-for", nargs="+", choices=list(BENCHES), default=[],
                        help="small sizes for these only (benchmarks that take minutes)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=None)
    parser.add_argument("--skip", nargs="+", choices=list(BENCHES), default=[])
    parser.add_argument("--baseline-venv", default=None,
                        help="reuse this venv with vastai installed (bench_cli_startup)")
    args = parser.parse_args(argv)
    names = [n for n in (args.only or list(BENCHES)) if n not in args.skip]
    info = machine_info()
    runs: dict[str, Any] = {}
    for name in names:
        extra = ["--baseline-venv", args.baseline_venv] \
            if name == "cli_startup" and args.baseline_venv else []
        started = time.time()
        runs[name] = run_one(name, args.quick or name in args.quick_for, extra)
        runs[name]["quick"] = args.quick or name in args.quick_for
        path = RESULTS / BENCHES[name][1]
        fresh = path.exists() and path.stat().st_mtime >= started
        runs[name]["results"] = json.loads(path.read_text()) if fresh else None
    rows: list[Row] = []
    for name in names:
        data = runs[name]["results"]
        rows += summarize(name, data) if data is not None else \
            [(name, "results", f"none (exit code {runs[name]['rc']})", "", False)]
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out = {"machine": info, "quick": args.quick or args.quick_for, "benchmarks": runs,
           "table": [dict(zip(("benchmark", "measure", "value", "target", "met"), r))
                     for r in rows]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "all.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{info['nproc']} x {info['cpu']}, {info['ram_gib']} GiB, Python {info['python']}, "
          f"{info['date']}, load {info['loadavg']} -> {info['loadavg_after']}"
          f"{' (quick sizes)' if args.quick else ''}"
          f"{f' (quick sizes for {chr(32).join(args.quick_for)})' if args.quick_for else ''}")
    print(format_table(rows))
    print(f"wrote {RESULTS / 'all.json'}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
