"""Several runs on one multi-GPU instance, the agent's side (issue 17): the plan's seat, the GPU
pin, per-GPU checks, the install lock, the cost guard's traffic share, and a watchdog that never
stops a machine another run on it still uses. Pure Python: tmp dirs, a fake clock, a fake opener.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from remote.checks import Probes, run_checks
from remote.costguard import CostGuard
from remote.install_lock import install_lock
from remote.plan import PlanError, load_plan, make_plan, write_json_atomic
from remote.runner import Runner
from remote.status import read_events
from remote.watchdog import RELEASED_MARKER, Watchdog, linger
from tests.test_bootstrap import aitk_env, aitk_spec, make_fake_aitk
from tests.test_checks import MEMINFO, SMI_HEADER, by_name, spec

# -- the plan's seat ---------------------------------------------------------------------------


def seat_plan(tmp_path: Path, **instance) -> dict:
    return make_plan(run_id="r-seat", spec={"name": "seat"}, run_dir=str(tmp_path / "r-seat"),
                     dataset_dir=str(tmp_path / "data"), provider="local", instance=instance)


@pytest.mark.parametrize("instance", [
    {"seat": 2, "seats": 2}, {"seat": -1, "seats": 2}, {"seat": "1", "seats": 2},
    {"seat": 1.0, "seats": 2}, {"seat": True, "seats": 2}, {"seats": 2}, {"seat": 1},
    {"seat": 0, "seats": 0}, {"seat": 0, "seats": "2"}])
def test_a_seat_outside_the_machine_is_a_bad_plan(tmp_path: Path, instance: dict) -> None:
    path = tmp_path / "plan.json"
    write_json_atomic(path, seat_plan(tmp_path, **instance))
    with pytest.raises(PlanError, match="instance.seat"):
        load_plan(path)


def test_a_plan_without_seats_or_with_a_valid_seat_loads(tmp_path: Path) -> None:
    for instance in ({}, {"seats": 1}, {"seat": 0, "seats": 1}, {"seat": 3, "seats": 4}):
        path = tmp_path / "plan.json"
        write_json_atomic(path, seat_plan(tmp_path, **instance))
        assert load_plan(path)["instance"] == instance


def test_a_seated_agent_pins_itself_and_its_trainer_to_its_gpu(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the container sees both GPUs
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    plan = seat_plan(tmp_path, seat=1, seats=2)
    runner = Runner(plan)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the agent's own: every child inherits it
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # CUDA's index = nvidia-smi's row
    assert runner.trainer_env()["CUDA_VISIBLE_DEVICES"] == "1"
    (runner.run_dir / "STOP").touch()  # the stages are skipped: only the start is run
    runner.run()
    seat_events = [e for e in read_events(runner.run_dir) if e["event"] == "gpu_seat"]
    assert [(e["seat"], e["seats"], e["cuda_visible_devices"]) for e in seat_events] == [
        (1, 2, "1")]


def test_a_run_with_the_whole_machine_is_not_pinned(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    runner = Runner(seat_plan(tmp_path, seat=0, seats=1), env={"PATH": "/usr/bin:/bin"})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in runner.trainer_env()
    (runner.run_dir / "STOP").touch()
    runner.run()
    assert not [e for e in read_events(runner.run_dir) if e["event"] == "gpu_seat"]


# -- checks about the seat's GPU ---------------------------------------------------------------
# nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version,uuid (index order): GPU 0
# is busy with the other run's trainer, GPU 1 is this run's and free.
SMI_TWO_GPUS = ("NVIDIA GeForce RTX 4090, 24564, 1200, 580.65.06, GPU-aaaa\n"
                "NVIDIA GeForce RTX 4090, 24564, 24000, 580.65.06, GPU-bbbb\n")
SMI_TWO_APPS = "4321, /venv/bin/python, 23000, GPU-aaaa\n"


def two_gpu_machine(asked: list[list[str]], *, torch=None, smi: bool = True,
                    env=None) -> Probes:
    def run(argv: list[str]) -> str | None:
        asked.append(argv)
        if not smi:
            return None
        if argv == ["nvidia-smi"]:
            return SMI_HEADER
        if argv[1].startswith("--query-gpu="):
            return SMI_TWO_GPUS if argv[1].endswith(",uuid") else None
        return SMI_TWO_APPS if argv[1].endswith(",gpu_uuid") else None

    files = {"/proc/meminfo": MEMINFO, "/proc/driver/nvidia/version": "NVRM version: 580"}
    return Probes(run=run, read=files.get, disk_free=lambda p: 500 * 1024 ** 3,
                  writable=lambda p: True, same_device=lambda a, b: False,
                  torch_info=lambda: torch, package_version=lambda name: "1.0", env=env or {})


def seated(seat: int, seats: int) -> dict:
    return {"run_dir": "/workspace/flux-remote/r1", "provider": "vast",
            "instance": {"seat": seat, "seats": seats}}


def test_checks_look_at_the_seats_gpu_only(tmp_path: Path) -> None:
    asked: list[list[str]] = []
    report = run_checks(spec(min_ram_gb=16.0), seated(1, 2), probes=two_gpu_machine(asked))
    checks = by_name(report)
    assert not report.failed, report.failed
    assert checks["vram_free_gb"].status == "pass" and checks["vram_free_gb"].value == 23.4
    assert "no other processes hold VRAM" in checks["vram_free_gb"].detail
    assert "1 process(es) of the other runs" in checks["vram_free_gb"].detail
    assert checks["gpu"].value == 2 and checks["gpu"].threshold == 2
    assert report.gpu["count"] == 1 and report.gpu["seat"] == 1
    assert [p["pid"] for p in report.gpu["co_tenants"]] == [4321]
    # seat 0 is the busy GPU: its own check warns about the other process's memory
    busy = by_name(run_checks(spec(min_ram_gb=16.0), seated(0, 2), probes=two_gpu_machine([])))
    assert busy["vram_free_gb"].status == "warn" and "pid 4321" in busy["vram_free_gb"].detail


def test_a_seat_the_machine_lacks_fails_the_gpu_check() -> None:
    report = run_checks(spec(min_ram_gb=16.0), seated(2, 3), probes=two_gpu_machine([]))
    gpu = by_name(report)["gpu"]
    assert gpu.status == "fail" and gpu.value == 2 and gpu.threshold == 3


def test_torch_in_the_pinned_agent_sees_the_seat_as_device_0() -> None:
    torch = {"version": "2.13.0", "cuda_build": "13.0", "cuda_available": True,
             "devices": [{"name": "NVIDIA H100", "total_gb": 80.0, "free_gb": 79.0}]}
    report = run_checks(spec(min_ram_gb=16.0), seated(1, 2),
                        probes=two_gpu_machine([], torch=torch, smi=False,
                                               env={"CUDA_VISIBLE_DEVICES": "1"}))
    assert not report.failed and report.gpu["name"] == "NVIDIA H100"


def test_ram_is_shared_by_the_seats() -> None:
    # MEMINFO's machine has 62.8 GB: enough for one run of 48 GB, not for two
    alone = by_name(run_checks(spec(), seated(0, 1), probes=two_gpu_machine([])))["ram_gb"]
    assert alone.status == "pass" and alone.threshold == 48.0
    two = by_name(run_checks(spec(), seated(1, 2), probes=two_gpu_machine([])))["ram_gb"]
    assert two.status == "warn" and two.threshold == 96.0 and "shared by 2 runs" in two.detail


# -- the install lock ---------------------------------------------------------------------------


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_agent_waits_for_the_first_ones_install(tmp_path: Path) -> None:
    from remote.bootstrap import bootstrap

    url, commit = make_fake_aitk(tmp_path)
    cache = tmp_path / "cache"
    logs: list[str] = []
    results: list = []

    def second_agent() -> None:
        results.append(bootstrap(aitk_spec(url, commit), cache_root=cache, env=aitk_env(),
                                 log=logs.append, image_checkouts=()))

    with install_lock(cache, log=lambda line: None):  # the first agent is installing
        thread = threading.Thread(target=second_agent)
        thread.start()
        wait_until(lambda: any("waiting for another run's install" in line for line in logs))
        time.sleep(0.1)
        assert thread.is_alive() and not (cache / "ai-toolkit").exists()
    thread.join(timeout=60)
    assert results and results[0].source == "built"


def test_two_agents_at_once_install_once(tmp_path: Path) -> None:
    from remote.bootstrap import bootstrap

    url, commit = make_fake_aitk(tmp_path)
    logs: list[str] = []
    results: list = []

    def agent() -> None:
        results.append(bootstrap(aitk_spec(url, commit), cache_root=tmp_path / "cache",
                                 env=aitk_env(), log=logs.append, image_checkouts=()))

    threads = [threading.Thread(target=agent) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(r.source for r in results) == ["built", "cached"]
    assert sum(line.startswith("$ git clone") for line in logs) == 1


# -- the cost guard's share of the traffic -------------------------------------------------------


def test_a_seat_is_billed_its_share_of_the_containers_traffic() -> None:
    plan = {"price_per_hour": 0.5, "budget_usd": 5.0, "billing_started_at": 1.0,
            "instance": {"inet_down_cost": 0.05, "seat": 1, "seats": 2}}
    ten_gb = 10_000_000_000  # every seat's downloads: /proc/net/dev is the container's
    seat = CostGuard.from_plan(plan, clock=lambda: 3601.0, rx_bytes=lambda: ten_gb)
    assert seat.spend() == pytest.approx(0.5 + 10 * 0.05 / 2)
    plan["instance"] = {"inet_down_cost": 0.05}
    whole = CostGuard.from_plan(plan, clock=lambda: 3601.0, rx_bytes=lambda: ten_gb)
    assert whole.spend() == pytest.approx(0.5 + 10 * 0.05)


# -- the watchdog and the other runs on the machine ---------------------------------------------
VAST_ENV = {"CONTAINER_API_KEY": "per-instance-key", "CONTAINER_ID": "4242",
            "VAST_URL": "http://vast.invalid"}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeOpener:
    """Answers the self-stop PUT as Vast does when it succeeds (HTTP 200, remote.watchdog)."""

    class Response:
        status = 200

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    def __init__(self) -> None:
        self.requests: list = []

    def __call__(self, request, timeout: float):
        self.requests.append((request.get_method(), request.full_url))
        return self.Response()


def sibling(root: Path, name: str, state: str, touched: float, *, raw: str | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    status = run_dir / "status.json"
    status.write_text(raw if raw is not None else json.dumps({"state": state}))
    os.utime(status, (touched, touched))
    return run_dir


def finished_dog(root: Path, clock: Clock, opener: FakeOpener) -> tuple[Watchdog, list[dict]]:
    own = root / "r-own"
    own.mkdir(parents=True)
    events: list[dict] = []
    dog = Watchdog(own, grace_s=60, env=VAST_ENV,
                   event=lambda kind, **data: events.append({"event": kind, **data}),
                   is_finished=lambda: True, cap_reached=lambda: False,
                   stop_training=lambda reason: None, clock=clock, opener=opener)
    return dog, events


def test_the_watchdog_waits_for_a_busy_sibling(tmp_path: Path) -> None:
    clock, opener = Clock(), FakeOpener()
    dog, events = finished_dog(tmp_path, clock, opener)
    clock.now += 61  # our controller is silent, our run is over; the other one trains
    other = sibling(tmp_path, "r-other", "running", clock.now)
    assert dog.check_once() is None and dog.check_once() is None
    assert not opener.requests
    assert events == [{"event": "watchdog", "action": "stop_instance_deferred",
                       "siblings": ["r-other"], "silence_s": 61}]  # journaled once
    sibling(tmp_path, "r-other", "done", clock.now)
    assert dog.check_once() == "stop_instance"
    assert opener.requests == [("PUT", "http://vast.invalid/api/v0/instances/4242/")]
    assert other.is_dir()


@pytest.mark.parametrize("how", ["stale", "released", "failed", "garbled", "not an object"])
def test_a_sibling_that_no_longer_needs_the_machine_does_not_keep_it(tmp_path: Path,
                                                                     how: str) -> None:
    clock, opener = Clock(), FakeOpener()
    dog, events = finished_dog(tmp_path, clock, opener)
    clock.now += 61
    touched = clock.now - 61 if how == "stale" else clock.now  # its agent and controller died
    raw = {"garbled": '{"state": "runn', "not an object": '["running"]'}.get(how)
    other = sibling(tmp_path, "r-other", "failed" if how == "failed" else "running", touched,
                    raw=raw)
    (tmp_path / "cache").mkdir()  # the shared cache root is no run
    if how == "released":
        (other / RELEASED_MARKER).touch()
    assert dog.check_once() == "stop_instance"
    assert [e["action"] for e in events] == ["stop_instance"]


def test_a_fresh_heartbeat_keeps_a_sibling_busy(tmp_path: Path) -> None:
    clock, opener = Clock(), FakeOpener()
    dog, _ = finished_dog(tmp_path, clock, opener)
    clock.now += 61
    other = sibling(tmp_path, "r-other", "running", clock.now - 600)  # a long step, no status
    heartbeat = other / "heartbeat"
    heartbeat.touch()
    os.utime(heartbeat, (clock.now, clock.now))  # its controller polls
    assert dog.check_once() is None and not opener.requests


def test_linger_waits_for_the_siblings_then_stops(tmp_path: Path) -> None:
    clock, opener = Clock(), FakeOpener()
    own = tmp_path / "r-own"
    own.mkdir()
    write_json_atomic(own / "status.json", {"state": "done"})
    other = sibling(tmp_path, "r-other", "running", clock.now)
    rounds = {"n": 0}

    def sleep(seconds: float) -> None:
        clock.now += seconds
        rounds["n"] += 1
        # the other run trains for 20 rounds (its agent writes its status), then ends
        sibling(tmp_path, "r-other", "running" if rounds["n"] < 20 else "done", clock.now)

    plan = {"run_dir": str(own), "heartbeat_grace_s": 60}
    assert linger(plan, env=VAST_ENV, clock=clock, sleep=sleep, opener=opener, max_s=3600)
    assert len(opener.requests) == 1 and rounds["n"] >= 20
    actions = [e["action"] for e in read_events(own) if e["event"] == "watchdog"]
    assert actions == ["stop_instance_deferred", "stop_instance"]
    assert other.is_dir()
