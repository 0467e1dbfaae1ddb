"""Run every benchmark, collect their JSON into bench/results/all.json, print one table.

Each benchmark is its own script (runnable alone) and writes ``bench/results/<name>.json``;
this runs them one after the other as subprocesses, then reads those files back. ``--quick``
shrinks every size (for a smoke run, not for the numbers in docs/performance.md).

    python bench/run_all.py [--quick | --quick-for ingest gpu] [--only ingest sync ...]
                            [--skip gpu] [--baseline-venv /tmp/vastai-venv] [--write-doc]

The table has one row per measured ratio or overhead with its target and whether it is met.
``--write-doc`` puts that table, as printed (misses marked MISSED), with the machine and the
command line, between the ``bench:begin``/``bench:end`` markers of docs/performance.md, and
copies ``all.json`` to docs/performance.json beside it: the summary is this script's output,
never typed.
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
DOC = HERE.parent / "docs" / "performance.md"
DOC_JSON = HERE.parent / "docs" / "performance.json"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (script, results file, full-size args, quick args)
BENCHES: dict[str, tuple[str, str, list[str], list[str]]] = {
    "cli_startup": ("bench_cli_startup.py", "cli_startup.json", ["--repeat", "10"],
                    ["--repeat", "3"]),
    "ingest": ("bench_ingest.py", "ingest.json", ["--n", "200"], ["--n", "40"]),
    "sync": ("bench_sync.py", "sync.json", ["--mb", "100", "--repeats", "5"],
             ["--mb", "20", "--repeats", "1"]),
    "planner": ("bench_planner.py", "planner.json", [], ["--draws", "60"]),
    "estimate": ("bench_estimate.py", "estimate.json", [], []),
    "controller": ("bench_controller.py", "controller.json", [], ["--quick"]),
    "gpu": ("bench_gpu.py", "gpu.json", [], ["--quick"]),
    "batch_reuse": ("bench_batch_reuse.py", "batch_reuse.json", [],
                    ["--runs", "4", "--steps", "4"]),
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
    return [("ingest", f"agent / naive loop (same JPEG output), {d['n']} images",
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
    a = d["all"]
    rows: list[Row] = []
    for key, label in (("lowest_dph", "lowest-$/h pick"), ("default_order", "Vast default order")):
        v = a[f"vs_{key}"]
        ratio = v["ratio_usd_per_finished_run"]
        rows.append(("planner", f"realised $ per finished run: planner / {label} "
                                f"({d['draws']} markets)",
                     f"{ratio:.3f} (per draw p10-p90 {v['per_draw_ratio_p10']:.2f}-"
                     f"{v['per_draw_ratio_p90']:.2f})" if ratio else "n/a", "<= 1",
                     ratio <= 1.0 if ratio else None))
    rows.append(("planner", "runs refused or capped when an offer would have finished",
                 f"{a['missed_finish_share']:.1%} ({a['refused_though_a_finish_existed']} refused, "
                 f"{a['stopped_at_cap_though_a_finish_existed']} capped of {a['runs']})", "", None))
    e = a["estimate_error"]
    rows.append(("planner", "estimate error realised/estimate - 1: mean, p90",
                 f"{e['mean']:+.3f}, {e['p90']:+.3f}", f"p90 <= safety_margin {d['safety_margin']}",
                 e["p90"] <= d["safety_margin"]))
    return rows


def _estimate(d: dict[str, Any]) -> list[Row]:
    a = d["all"]
    return [("estimate", f"metered / estimate in the receipt ({a['runs']} runs: GPUs x shapes x "
                         "failures)",
             f"{a['share_within']:.0%} within 20 % (p10 {a['ratio_p10']:.2f}, median "
             f"{a['ratio_median']:.2f}, p90 {a['ratio_p90']:.2f})", "all within 20 %",
             a["share_within"] == 1.0)]


def _batch_reuse(d: dict[str, Any]) -> list[Row]:
    base, reuse = d["baseline"], d["reuse"]
    ratio = d["instance_time_ratio"]
    return [("batch_reuse", f"{d['runs']}-run sweep, max_parallel {d['max_parallel']}: billed "
                            "instance time, reuse / one instance per run (the fake's bill)",
             f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({reuse['instances']} vs "
             f"{base['instances']} instances; GPU time {d['gpu_time_ratio'] or 0:.2f}, $ "
             f"{d['usd_ratio'] or 0:.2f}; setup {d['setup_share_of_baseline'] or 0:.0%} of the "
             "baseline)", f"<= {d['target_ratio']:.2f}, every run done", d["met"])]


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
    "estimate": _estimate, "controller": _controller, "gpu": _gpu,
    "batch_reuse": _batch_reuse,
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
        met = "" if row[4] is None else ("yes" if row[4] else "MISSED")
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + met)
    return "\n".join(lines)


def _met(met: "bool | None") -> str:
    return "" if met is None else ("yes" if met else "**MISSED**")


def markdown(out: dict[str, Any], command: str) -> str:
    """The summary block of docs/performance.md, from ``all.json``'s content only."""
    m = out["machine"]
    lines = [BEGIN,
             f"Written by `{command}` on {m['date']}: {m['nproc']} x {m['cpu']}, "
             f"{m['ram_gib']} GiB, Python {m['python']} ({m['platform']}), load average "
             f"{m['loadavg']} -> {m.get('loadavg_after')}"
             + (f"; quick sizes: {out['quick']}" if out["quick"] else "")
             + ". Raw JSON: [performance.json](performance.json).", "",
             "| benchmark | measure | value | target | met |", "|---|---|---|---|---|"]
    for row in out["table"]:
        cells = [str(row[k]).replace("|", "\\|") for k in ("benchmark", "measure", "value",
                                                           "target")]
        lines.append("| " + " | ".join(cells) + f" | {_met(row['met'])} |")
    failed = [f"{n} (exit code {b['rc']})" for n, b in out["benchmarks"].items() if b["rc"]]
    if failed:
        lines += ["", "Benchmarks that exited non-zero: " + ", ".join(failed) + "."]
    lines.append(END)
    return "\n".join(lines)


def write_doc(out: dict[str, Any], command: str, doc: Path = DOC,
              doc_json: Path = DOC_JSON) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers to write between")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + markdown(out, command) + rest.split(END, 1)[1], encoding="utf-8")
    doc_json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


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
    parser.add_argument("--write-doc", action="store_true",
                        help="write the table into docs/performance.md and the JSON beside it")
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
    if args.write_doc:
        command = "python bench/run_all.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:])
        write_doc(out, command.strip())
    print(f"\n{info['nproc']} x {info['cpu']}, {info['ram_gib']} GiB, Python {info['python']}, "
          f"{info['date']}, load {info['loadavg']} -> {info['loadavg_after']}"
          f"{' (quick sizes)' if args.quick else ''}"
          f"{f' (quick sizes for {chr(32).join(args.quick_for)})' if args.quick_for else ''}")
    print(format_table(rows))
    print(f"wrote {RESULTS / 'all.json'}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
