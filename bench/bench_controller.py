"""Controller overhead (issue 10, item 4): what the laptop side adds to a run, on FakeVast + sshd.

The Vast API is ``tests.fakevast.FakeVast`` (each request time-stamped here) and the "instance" is
a real OpenSSH server on 127.0.0.1 (``tests.fixtures_sshd.SshServer``); the agent and its tiny
trainer really run behind it. Each controller is its own process (``controller_child.py``),
driving ``controller.run.orchestrator`` with ``controller.providers.vast.VastProvider``, so its RSS is
the controller's alone. Measured:

* **start**: from the ``launch`` call (search offers, plan, create, wait, attach key, SSH, rsync of
  the agent and the dataset, plan.json, agent start) to "agent started". The *simulated waits*
  (Vast's rate-limit spacing and the readiness polls while FakeVast "loads") are recorded by an
  injected sleep and not slept, so the time is the controller's own overhead. Target < 5 s.
* **destroy**: from the agent's last training step (``status.json`` train stage ``ended_at``) to
  the DELETE request FakeVast received, with its parts: the agent's own finish (validate,
  publish), the poll lag until the controller sees it, the fetch, the rest. Target < 10 s + fetch.
* **API calls per instance-hour while following**: FakeVast requests between "agent started" and
  the poll that saw the agent end, per hour of following; healthy, and across an SSH outage made
  here (sshd stopped for ``--outage`` s mid-run; the SSH host reconnects on its own for up to
  120 s before the follower asks Vast whether the machine still exists). Compared with the
  client's documented spacing (show 2 s, list 1 s ...).
* **RSS while following**: VmRSS sampled at every poll and VmHWM, one run; then a batch of
  ``--concurrent`` runs all at once in one controller process (``controller.batch.scheduler``, what
  ``flux-remote launch batch.yaml`` drives), sampled every 0.25 s. Without ``controller.batch.scheduler``
  (or with ``--processes``) as many separate controller processes sharing one journal.

    python bench/bench_controller.py [--quick] [--steps 60] [--repeats 3] [--concurrent 4]
                                     [--outage 6] [--processes]

Results go to bench/results/controller.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

START_TARGET_S = 5.0
DESTROY_TARGET_S = 10.0  # plus the fetch time
CHILD_TIMEOUT_S = 300.0


# ---- pure helpers (tested in tests/test_bench_smoke.py) ----------------------------------------

def endpoint_kind(method: str, path: str) -> str:
    """The client's rate-limit class of one Vast request (``controller.vast.client.MIN_INTERVALS``)."""
    if path.startswith("/api/v0/bundles"):
        return "search"
    if path.startswith("/api/v0/asks/"):
        return "create"
    if path.startswith("/api/v1/instances"):
        return "list"
    if path.startswith("/api/v0/instances/") and not path.rstrip("/").endswith("ssh"):
        return {"GET": "show", "DELETE": "destroy"}.get(method, "other")
    return "other"


def per_hour(requests: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Requests with ``t`` in [start, end) counted by kind, and extrapolated to one hour."""
    inside = [r for r in requests if start <= r["t"] < end]
    counts: dict[str, int] = {}
    for r in inside:
        kind = endpoint_kind(r["method"], r["path"])
        counts[kind] = counts.get(kind, 0) + 1
    hours = max(end - start, 1e-9) / 3600
    return {"seconds": round(end - start, 2), "calls": len(inside), "by_kind": counts,
            "per_hour": round(len(inside) / hours, 1),
            "per_hour_by_kind": {k: round(v / hours, 1) for k, v in counts.items()}}


def limits_per_hour() -> dict[str, float]:
    """The most calls per hour the documented spacing allows, per endpoint kind."""
    from controller.vast.client import MIN_INTERVALS

    return {kind: round(3600 / s, 1) for kind, s in MIN_INTERVALS.items() if s > 0}


# ---- the harness -----------------------------------------------------------------------------

def _timed_fake_class() -> type:
    from tests.fakevast import FakeVast

    class TimedFakeVast(FakeVast):
        """FakeVast whose request log also says when each request arrived (``t``)."""

        def handle(self, method: str, path: str, query: dict[str, list[str]],
                   headers: dict[str, str], body: Any) -> tuple[int, Any] | None:
            with self._lock:
                index = len(self.requests)
                answer = super().handle(method, path, query, headers, body)
                self.requests[index]["t"] = time.time()
            return answer

    return TimedFakeVast


def _offers(copies: int) -> list[dict[str, Any]]:
    """The reference offers and ``copies`` dearer twins of each (a rented offer leaves FakeVast's
    list, and every run of the benchmark rents one)."""
    from tests.fakevast import reference_offers

    base = reference_offers()
    twins = [{**o, "id": int(o["id"]) + 1000 * n, "dph_total": float(o["dph_total"]) * (1 + n / 20)}
             for n in range(1, copies + 1) for o in base]
    return base + twins


class Harness:
    """FakeVast + sshd + a state dir; ``launch()`` runs controller processes against them."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        from tests.fixtures_sshd import SshServer, _keygen

        self.tmp, self.args = tmp, args
        self.key = tmp / "client_key"
        _keygen(self.key)
        (tmp / "sshd").mkdir()
        self.sshd = SshServer(tmp / "sshd", self.key)
        self.fake = _timed_fake_class()(offers=_offers(args.repeats + 2 * args.concurrent + 1),
                                        loading_polls=2)
        self.home = tmp / "home"
        self.instance_root = tmp / "instance-root"

    def __enter__(self) -> "Harness":
        self.sshd.start()
        self.fake.start()
        self.fake.ssh_endpoint = (self.sshd.host, self.sshd.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fake.stop()
        self.sshd.stop()

    def spec(self, name: str, batch: dict[str, Any] | None = None) -> Path:
        import yaml

        from tests.test_launch_local import write_spec

        path = write_spec(self.tmp, name=name, steps=self.args.steps, budget=5.0, provider={
            "type": "vast", "remote_root": str(self.instance_root),
            "remote_python": sys.executable})
        if batch is not None:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            path.write_text(yaml.safe_dump({**data, "batch": batch}), encoding="utf-8")
        return path

    def launch(self, names: list[str], batch: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One controller process per name, all at once; their results in the same order.
        With ``batch``, each process launches a batch file (that section added to the spec)."""
        env = dict(os.environ, FLUX_REMOTE_HOME=str(self.home), VAST_URL=self.fake.url,
                   VAST_API_KEY=self.fake.api_key,
                   FLUX_REMOTE_TINY_STEP_DELAY=str(self.args.step_delay))
        procs = []
        for name in names:
            cfg = {"spec": str(self.spec(name, batch)), "out": str(self.tmp / "out" / name),
                   "batch": batch is not None,
                   "url": self.fake.url, "api_key": self.fake.api_key,
                   "ssh_user": self.sshd.user, "key_path": str(self.key),
                   "known_hosts": str(self.home / "known_hosts"),
                   "poll_interval": self.args.poll_interval, "spawned_at": time.time(),
                   "result": str(self.tmp / f"{name}.result.json")}
            cfg_path = self.tmp / f"{name}.cfg.json"
            cfg_path.write_text(json.dumps(cfg))
            log = open(self.tmp / f"{name}.log", "wb")
            procs.append((name, cfg, log, subprocess.Popen(
                [sys.executable, str(HERE / "controller_child.py"), str(cfg_path)],
                env=env, stdout=log, stderr=subprocess.STDOUT)))
        results = []
        for name, cfg, log, proc in procs:
            try:
                proc.wait(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            if proc.returncode != 0 or not Path(cfg["result"]).exists():
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"controller {name} failed (rc {proc.returncode}):\n{tail}")
            results.append(json.loads(Path(cfg["result"]).read_text()))
        return results

    def outage_when_training(self, at_step: int, seconds: float) -> dict[str, float]:
        """In a thread: once a run's status.json reaches ``at_step``, stop sshd for ``seconds``."""
        window: dict[str, float] = {}

        def watch() -> None:
            deadline = time.time() + CHILD_TIMEOUT_S
            while time.time() < deadline:
                for status in self.instance_root.glob("*/status.json"):
                    try:
                        step = json.loads(status.read_text()).get("step") or 0
                    except (OSError, ValueError):
                        continue
                    if step >= at_step:
                        window["start"] = time.time()
                        self.sshd.stop()
                        time.sleep(seconds)
                        self.sshd.start()
                        window["end"] = time.time()
                        return
                time.sleep(0.05)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        window["_thread"] = thread  # type: ignore[assignment]
        return window


def analyse_single(res: dict[str, Any], requests: list[dict[str, Any]],
                   outage: dict[str, float],
                   agent_done: tuple[float | None, float | None]) -> dict[str, Any]:
    """Start and destroy overheads, follow-phase API rates, RSS of one run."""
    delete_t = next((r["t"] for r in requests if r["method"] == "DELETE"
                     and str(res["instance_id"]) in r["path"]), None)
    start_s = res["agent_started_at"] - res["launched_at"]
    follow_start, follow_end = res["agent_started_at"], res["agent_end_seen_at"]
    follow = per_hour(requests, follow_start, follow_end)
    out: dict[str, Any] = {
        "state": res["state"],
        "start": {
            "launch_to_agent_started_s": round(start_s, 3),
            "process_start_to_agent_started_s": round(res["agent_started_at"] - res["spawned_at"], 3),
            "plan_s": round(res["planned_at"] - res["launched_at"], 3),
            "rent_and_boot_s": round(res["shipping_at"] - res["renting_at"], 3),
            "ship_and_start_s": round(res["agent_started_at"] - res["shipping_at"], 3),
            "upload_s": round(res["upload_s"], 3),
            "simulated_waits_not_slept": res["simulated_waits"],
            "target_s": START_TARGET_S, "met": start_s < START_TARGET_S,
        },
        "follow_api": follow,
        "rss": {"follow_max_mib": round((res["rss_follow_max_kib"] or 0) / 1024, 1),
                "hwm_mib": round((res["vm_hwm_kib"] or 0) / 1024, 1),
                "samples": res["rss_follow_samples"]},
    }
    if res["last_step_at"] and delete_t:
        lag = delete_t - res["last_step_at"]
        destroy: dict[str, Any] = {
            "last_step_to_destroy_request_s": round(lag, 3),
            "last_step_to_destroy_confirmed_s": round(res["destroyed_at"] - res["last_step_at"], 3),
            "fetch_s": round(res["fetch_s"], 3),
            "target_s": f"< {DESTROY_TARGET_S:g} + fetch",
            "met": lag < DESTROY_TARGET_S + res["fetch_s"],
        }
        agent_done_at, rc_at = agent_done
        if agent_done_at and rc_at:
            destroy["agent_finish_after_last_step_s"] = round(agent_done_at - res["last_step_at"], 3)
            destroy["agent_exit_after_final_status_s"] = round(rc_at - agent_done_at, 3)
            destroy["poll_lag_after_exit_s"] = round(res["agent_end_seen_at"] - rc_at, 3)
        destroy["finish_steps_s"] = res["finish_steps_s"]
        destroy["seen_to_destroy_request_s"] = round(delete_t - res["agent_end_seen_at"], 3)
        if res["fetch_note_at"]:
            destroy["seen_to_fetch_start_s"] = round(res["fetch_note_at"] - res["agent_end_seen_at"], 3)
            destroy["fetch_end_to_destroy_request_s"] = round(
                delete_t - res["fetch_note_at"] - res["fetch_s"], 3)
        out["destroy"] = destroy
    if outage.get("end"):
        recovered = next((t for t in res["polls"] if t > outage["end"]), outage["end"])
        during = per_hour(requests, outage["start"], recovered)
        healthy_calls = follow["calls"] - during["calls"]
        healthy_s = follow["seconds"] - during["seconds"]
        out["follow_api"] = {
            "healthy": {"seconds": round(healthy_s, 2), "calls": healthy_calls,
                        "per_hour": round(healthy_calls / max(healthy_s, 1e-9) * 3600, 1)},
            "ssh_outage": during,
            "whole_follow": follow,
        }
    return out


def with_medians(singles: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's analysis; with more runs, the start and destroy times of each and their
    medians, which then decide whether the targets are met."""
    import statistics

    out = dict(singles[0])
    if len(singles) < 2:
        return out
    starts = [s["start"]["launch_to_agent_started_s"] for s in singles]
    out["start"] = {**out["start"], "each_s": starts, "median_s": round(statistics.median(starts), 3),
                    "met": statistics.median(starts) < START_TARGET_S}
    destroys = [s["destroy"] for s in singles if "destroy" in s]
    if destroys:
        lags = [d["last_step_to_destroy_request_s"] for d in destroys]
        fetches = [d["fetch_s"] for d in destroys]
        extras = [d["finish_steps_s"].get("fetch_extras", 0.0) for d in destroys]
        out["destroy"] = {**out["destroy"], "each_s": lags, "median_s": round(statistics.median(lags), 3),
                          "fetch_each_s": fetches, "fetch_extras_each_s": extras,
                          "met": statistics.median(lags) < DESTROY_TARGET_S
                          + statistics.median(fetches)}
    out["states"] = [s["state"] for s in singles]
    return out


def analyse_concurrent(results: list[dict[str, Any]],
                       requests: list[dict[str, Any]]) -> dict[str, Any]:
    starts = [r["agent_started_at"] - r["launched_at"] for r in results]
    rss = [(r["rss_follow_max_kib"] or 0) / 1024 for r in results]
    first = min(r["agent_started_at"] for r in results)
    last = max(r["agent_end_seen_at"] for r in results)
    calls = sum(per_hour(requests, r["agent_started_at"], r["agent_end_seen_at"])["calls"]
                for r in results)
    run_hours = sum(r["agent_end_seen_at"] - r["agent_started_at"] for r in results) / 3600
    return {
        "runs": len(results), "states": [r["state"] for r in results],
        "launch_to_agent_started_s": [round(s, 2) for s in starts],
        "rss_follow_max_mib_each": [round(x, 1) for x in rss],
        "rss_follow_max_mib_total": round(sum(rss), 1),
        "hwm_mib_each": [round((r["vm_hwm_kib"] or 0) / 1024, 1) for r in results],
        "follow_calls_per_instance_hour": round(calls / max(run_hours, 1e-9), 1),
        "account_calls_while_all_follow": per_hour(requests, first, last),
        "how": "separate controller processes sharing one journal (not `launch batch.yaml`)",
    }


def analyse_batch(res: dict[str, Any], requests: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in res["runs"] if r["agent_started_at"] and r["agent_end_seen_at"]]
    calls = sum(per_hour(requests, r["agent_started_at"], r["agent_end_seen_at"])["calls"]
                for r in runs)
    run_hours = sum(r["agent_end_seen_at"] - r["agent_started_at"] for r in runs) / 3600
    return {
        "runs": len(res["runs"]), "batch_state": res["batch_state"],
        "states": [r["state"] for r in res["runs"]],
        "seconds": round(res["ended_at"] - res["launched_at"], 1),
        "rss_max_mib": round(res["rss_max_kib"] / 1024, 1),
        "hwm_mib": round((res["vm_hwm_kib"] or 0) / 1024, 1),
        "follow_calls_per_instance_hour": round(calls / max(run_hours, 1e-9), 1),
        "account_calls_whole_batch": per_hour(requests, res["launched_at"], res["ended_at"]),
        "how": "one controller process: `launch batch.yaml` through controller.batch.scheduler",
    }


def _agent_done_at(root: Path, run_id: str) -> tuple[float | None, float | None]:
    """When the agent wrote its last status, and when its exit code file appeared."""
    try:
        status = json.loads((root / run_id / "status.json").read_text())
        rc_at = (root / run_id / "agent.rc").stat().st_mtime
    except (OSError, ValueError):
        return None, None
    return status.get("updated_at"), rc_at


def _batch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("controller.batch.scheduler") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter outage")
    parser.add_argument("--steps", type=int, default=None, help="tiny-trainer steps (60)")
    parser.add_argument("--step-delay", type=float, default=0.25, help="s per step (0.25)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="as the CLI (2.0)")
    parser.add_argument("--outage", type=float, default=None, help="s of SSH outage (6; 0: none)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="single runs; medians are reported (3; quick 1)")
    parser.add_argument("--concurrent", type=int, default=4, help="runs at once (0: skip)")
    parser.add_argument("--processes", action="store_true",
                        help="also run --concurrent separate controller processes (done anyway "
                             "when controller.batch.scheduler is missing)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 60)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.outage = (3.0 if args.quick else 6.0) if args.outage is None else args.outage

    from tests.fixtures_sshd import _missing_tools

    missing = _missing_tools()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-controller-") as tmp, \
            Harness(Path(tmp), args) as harness:
        singles = []
        for i in range(max(1, args.repeats)):
            outage: dict[str, Any] = {}
            if args.outage > 0 and i == 0:  # the first run also gets the SSH outage
                outage = harness.outage_when_training(max(2, args.steps // 3), args.outage)
            [single] = harness.launch([f"single{i}"])
            if outage:
                outage.pop("_thread").join(timeout=args.outage + 10)
            singles.append(analyse_single(single, list(harness.fake.requests), outage,
                                          _agent_done_at(harness.instance_root, single["run_id"])))
            if i == 0:
                single_raw = {k: v for k, v in single.items() if k != "polls"}
        single_out = with_medians(singles)
        concurrent_out = None
        batch_ok = _batch_available()
        if args.concurrent > 0 and (args.processes or not batch_ok):
            before = len(harness.fake.requests)
            results = harness.launch([f"c{i}" for i in range(args.concurrent)])
            concurrent_out = analyse_concurrent(results, list(harness.fake.requests)[before:])
        batch_out: dict[str, Any] | None = None
        if args.concurrent > 0 and batch_ok:
            before = len(harness.fake.requests)
            lrs = [round(1e-3 * (i + 1), 6) for i in range(args.concurrent)]
            [res] = harness.launch(["batch"], batch={
                "max_usd": 10.0 * args.concurrent, "max_parallel": args.concurrent,
                "sweep": {"training.lr": lrs}})
            batch_out = analyse_batch(res, list(harness.fake.requests)[before:])
        elif args.concurrent > 0:
            batch_out = {"skipped": "controller.batch.scheduler is not available in this checkout"}

    limits = limits_per_hour()
    out = {
        "benchmark": "controller",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg": list(os.getloadavg())},
        "params": {"steps": args.steps, "step_delay_s": args.step_delay,
                   "poll_interval_s": args.poll_interval, "outage_s": args.outage,
                   "concurrent": args.concurrent, "quick": args.quick},
        "single": single_out, "concurrent": concurrent_out, "batch": batch_out,
        "single_raw": single_raw,
        "limits_per_hour": limits,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "controller.json").write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)
    return 0 if all(s["state"] == "done" for s in singles) else 1


def print_table(out: dict[str, Any]) -> None:
    s = out["single"]
    start, destroy = s["start"], s.get("destroy") or {}
    waits = start["simulated_waits_not_slept"]
    api = s["follow_api"]
    healthy = api.get("healthy", api)
    rows = [
        ("launch -> agent started" + (" (median)" if "median_s" in start else ""),
         f"{start.get('median_s', start['launch_to_agent_started_s']):.2f} s", "< 5 s",
         start["met"]),
        ("  (+ process start, imports)", f"{start['process_start_to_agent_started_s']:.2f} s",
         "", None),
        ("  simulated waits not slept", f"{waits['client_s'] + waits['provider_s']:.1f} s", "",
         None),
    ]
    if destroy:
        rows.append(("last step -> destroy request" + (" (median)" if "median_s" in destroy
                                                       else ""),
                     f"{destroy.get('median_s', destroy['last_step_to_destroy_request_s']):.2f} s",
                     f"< 10 s + {destroy['fetch_s']:.2f} s", destroy["met"]))
    rows.append(("API calls / instance-hour, healthy", f"{healthy['per_hour']:.0f}",
                 f"show <= {out['limits_per_hour']['show']:.0f}", None))
    if "ssh_outage" in api:
        rows.append(("  during an SSH outage", f"{api['ssh_outage']['per_hour']:.0f}",
                     f"show <= {out['limits_per_hour']['show']:.0f}", None))
    rows.append(("controller RSS following 1 run", f"{s['rss']['follow_max_mib']:.1f} MiB", "",
                 None))
    c = out.get("concurrent")
    if c:
        rows.append((f"RSS following {c['runs']} runs (sum)",
                     f"{c['rss_follow_max_mib_total']:.1f} MiB", "", None))
        rows.append((f"API calls / instance-hour, {c['runs']} runs",
                     f"{c['follow_calls_per_instance_hour']:.0f}", "", None))
    b = out.get("batch")
    if b and "skipped" not in b:
        rows.append((f"RSS following a {b['runs']}-run batch", f"{b['rss_max_mib']:.1f} MiB", "",
                     None))
        rows.append(("API calls / instance-hour, batch",
                     f"{b['follow_calls_per_instance_hour']:.0f}", "", None))
    print(f"controller overhead on FakeVast + local sshd ({out['params']['steps']} tiny steps, "
          f"poll {out['params']['poll_interval_s']:g} s)")
    print(f"{'measure':38} {'value':>14} {'target':>18}  ok")
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:38} {value:>14} {target:>18}  {mark}")


if __name__ == "__main__":
    sys.exit(main())
