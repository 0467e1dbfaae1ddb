"""The controller process of ``bench_controller.py``: one ``launch`` (or one batch) through the
controller's Python API against FakeVast and the bench's sshd, timed from the inside.

Run by the benchmark as ``python bench/controller_child.py CONFIG.json`` (the config names the
spec, FakeVast's URL and key, the SSH user and key, where to write the result); being its own
process, its RSS is the controller's alone. Waits the fake API would impose (rate-limit spacing,
readiness polls) go through an injected sleep that records them and returns at once; the
follower's poll interval is slept for real, as in ``flux-remote launch``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def proc_status_kib(field: str, text: str | None = None) -> int | None:
    """A ``VmRSS:``/``VmHWM:`` style field of /proc/self/status, in KiB (None when absent)."""
    if text is None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None



class WaitRecorder:
    """An injected ``sleep`` that records what would have been waited and returns at once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0

    def __call__(self, seconds: float) -> None:
        self.seconds += max(0.0, seconds)
        self.count += 1


class TimingReporter:
    """The orchestrator's reporter: time-stamps notes and polls, samples RSS at every poll."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, str]] = []
        self.polls: list[float] = []
        self.rss_kib: list[int] = []
        self.agent_end_seen: float | None = None
        self.log_lines = 0

    def note(self, text: str) -> None:
        self.notes.append((time.time(), text))

    def update(self, snap: Any) -> None:
        now = time.time()
        self.polls.append(now)
        rss = proc_status_kib("VmRSS")
        if rss is not None:
            self.rss_kib.append(rss)
        if snap.finished and self.agent_end_seen is None:
            self.agent_end_seen = now

    def log(self, lines: list[str]) -> None:
        self.log_lines += len(lines)

    def first(self, prefix: str) -> float | None:
        return next((t for t, text in self.notes if text.startswith(prefix)), None)


def make_provider(cfg: dict[str, Any], client_waits: WaitRecorder,
                  provider_waits: WaitRecorder, **extra: Any) -> Any:
    """A VastProvider on FakeVast that logs in to the sshd with the bench's key; its waits are
    recorded, not slept."""
    from controller.providers.vast import VastProvider
    from controller.vast.client import VastClient
    from controller.vast.readiness import Deadlines

    client = VastClient(api_key=cfg["api_key"], base_url=cfg["url"], sleep=client_waits)
    key_path = Path(cfg["key_path"])
    return VastProvider(client, ssh_user=cfg["ssh_user"], key_path=key_path,
                        public_key=Path(f"{key_path}.pub").read_text().strip(),
                        known_hosts_path=Path(cfg["known_hosts"]), deadlines=Deadlines(),
                        sleep=provider_waits, **extra)


class RssSampler:
    """Samples this process's VmRSS every ``every`` seconds in a thread (the batch has no single
    reporter to hook)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.max_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            rss = proc_status_kib("VmRSS") or 0
            self.max_kib = max(self.max_kib, rss)
            self.samples += 1

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child_batch(cfg: dict[str, Any]) -> dict[str, Any]:
    """``launch batch.yaml`` through the Python API (controller.batch.scheduler): RSS and follow windows."""
    from controller.batch.scheduler import BatchOptions, BatchScheduler
    from controller.batch.setup import create_batch
    from controller.journal import open_journal
    from controller.spec.loader import load_file

    client_waits, provider_waits = WaitRecorder(), WaitRecorder()
    journal = open_journal()
    launched_at = time.time()
    batch_id = create_batch(journal, load_file(Path(cfg["spec"])), out_dir=Path(cfg["out"]))

    def factory(name: str, claims: Any) -> Any:
        return make_provider(cfg, client_waits, provider_waits, offer_claims=claims,
                             measured_s_per_step=journal.measured_s_per_step())

    with RssSampler() as sampler:
        result = BatchScheduler(journal, batch_id, provider_factory=factory,
                                options=BatchOptions(poll_interval=cfg["poll_interval"])).run()
    ended_at = time.time()
    runs = []
    for run in journal.runs_of_batch(batch_id):
        started = [e["at"] for e in journal.events(run["run_id"], kind="agent_started")]
        fetching = [e["at"] for e in journal.events(run["run_id"], kind="state")
                    if (e["detail"] or {}).get("state") == "fetching"]
        runs.append({"run_id": run["run_id"], "state": run["state"],
                     "agent_started_at": started[0] if started else None,
                     "agent_end_seen_at": fetching[0] if fetching else None})
    return {"batch_state": result.state, "runs": runs, "launched_at": launched_at,
            "ended_at": ended_at, "rss_max_kib": sampler.max_kib, "rss_samples": sampler.samples,
            "vm_hwm_kib": proc_status_kib("VmHWM")}


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One ``launch`` through the Python API, as the CLI would drive it; returns its timings."""
    imported_at = time.time()
    from controller.journal import open_journal
    from controller.run.orchestrator import Options, Orchestrator
    from controller.spec.loader import load_spec

    import controller.run.orchestrator as orchestrator_module

    steps: dict[str, float] = {}  # seconds spent in the finish's steps (names as in orchestrator)
    for name in ("fetch_bundle", "fetch_extras", "remove_secrets"):
        setattr(orchestrator_module, name, _timed(steps, name, getattr(orchestrator_module, name)))
    client_waits, provider_waits = WaitRecorder(), WaitRecorder()
    provider = make_provider(cfg, client_waits, provider_waits)
    reporter = TimingReporter()
    journal = open_journal()
    launched_at = time.time()
    spec = load_spec(Path(cfg["spec"]))
    orch = Orchestrator(journal, provider, reporter=reporter)
    estimate = provider.estimate(spec)
    planned_at = time.time()
    run_id = orch.create_run(spec, estimate, out_dir=Path(cfg["out"]))
    outcome = orch.drive(run_id, Options(poll_interval=cfg["poll_interval"]), estimate)
    ended_at = time.time()
    receipt_path = Path(cfg["out"]) / "controller_receipt.json"
    receipt = json.loads(receipt_path.read_text()) if receipt_path.exists() else {}
    transfers = [e["detail"] for e in journal.events(run_id, kind="transfer")]
    status_path = Path(cfg["out"]) / "logs" / "status.json"
    stages = json.loads(status_path.read_text()).get("stages", {}) if status_path.exists() else {}
    return {
        "run_id": run_id, "state": outcome.state, "error": outcome.error,
        "instance_id": receipt.get("instance_id"),
        "spawned_at": cfg["spawned_at"], "imported_at": imported_at,
        "launched_at": launched_at, "planned_at": planned_at,
        "renting_at": reporter.first("renting offer"),
        "shipping_at": reporter.first("shipping"),
        "agent_started_at": reporter.first("agent started"),
        "fetch_note_at": reporter.first("fetching the bundle"),
        "agent_end_seen_at": reporter.agent_end_seen,
        "polls": reporter.polls, "ended_at": ended_at,
        "last_step_at": receipt.get("last_step_at"), "destroyed_at": receipt.get("destroyed_at"),
        "upload_s": sum(t["seconds"] for t in transfers if t["direction"] == "up"),
        "fetch_s": sum(t["seconds"] for t in transfers if t["direction"] == "down"),
        "simulated_waits": {"client_s": round(client_waits.seconds, 2),
                            "client_n": client_waits.count,
                            "provider_s": round(provider_waits.seconds, 2),
                            "provider_n": provider_waits.count},
        "rss_follow_max_kib": max(reporter.rss_kib, default=None),
        "rss_follow_samples": len(reporter.rss_kib),
        "vm_hwm_kib": proc_status_kib("VmHWM"),
        "log_lines": reporter.log_lines,
        "finish_steps_s": {k: round(v, 3) for k, v in steps.items()},
        "agent_stages": {name: [st.get("started_at"), st.get("ended_at")]
                         for name, st in stages.items()},
    }


def _timed(into: dict[str, float], name: str, fn: Any) -> Any:
    """``fn``, adding the seconds each call takes to ``into[name]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - started
    return wrapper


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: controller_child.py CONFIG.json (run by bench_controller.py)",
              file=sys.stderr)
        return 2
    cfg = json.loads(Path(args[0]).read_text())
    result = child_batch(cfg) if cfg.get("batch") else child(cfg)
    Path(cfg["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
