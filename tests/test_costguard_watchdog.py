"""The cost guard's projection and the watchdog's self-stop, with an injected clock and a real
local HTTP server standing in for Vast."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from remote.costguard import CostGuard, ReceivedSince, received_bytes
from remote.watchdog import Watchdog, stop_instance_request


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def guard(clock: Clock, **kw) -> CostGuard:
    args = dict(price_per_hour=3.6, budget_usd=1.0, max_hours=None, started_at=clock.now,
                clock=clock, reserve_s=0.0)
    args.update(kw)
    return CostGuard(**args)


def test_spend_is_price_times_hours() -> None:
    clock = Clock()
    g = guard(clock)
    clock.now += 600  # 10 minutes at $3.60/h
    assert g.spend() == pytest.approx(0.6)
    assert not g.cap_reached()


def test_stops_when_the_next_checkpoint_would_cross_the_budget() -> None:
    clock = Clock()
    g = guard(clock)  # $0.001 per second; budget lasts 1000 s
    clock.now += 800
    # step 100, save every 100 at 1 s/step: next checkpoint in 100 s -> $0.90, fine
    assert g.check(step=100, s_per_step=1.0, save_every=100) is None
    # step 150 at 3 s/step: next checkpoint (200) in 150 s -> $0.95, fine
    assert g.check(step=150, s_per_step=3.0, save_every=100) is None
    # step 110 at 3 s/step: next checkpoint in 270 s -> $1.07 > $1
    reason = g.check(step=110, s_per_step=3.0, save_every=100)
    assert reason and "step 200" in reason and "budget" in reason
    assert g.stop_reason == reason


def test_a_trainer_stopped_after_its_next_save_is_judged_one_checkpoint_further() -> None:
    clock = Clock()
    g = guard(clock)
    clock.now += 500
    # next checkpoint (200) in 100 s: $0.60 fits; the one after (300) in 200 s: $0.70 fits
    assert g.check(step=100, s_per_step=1.0, save_every=100, saves_ahead=2) is None
    # at 2 s/step the checkpoint at 300 lands at $0.90, at 3 s/step at $1.10: stop now,
    # so that the trainer ends just after saving step 200
    assert g.check(step=100, s_per_step=2.0, save_every=100, saves_ahead=2) is None
    assert "step 300" in g.check(step=100, s_per_step=3.0, save_every=100, saves_ahead=2)


def test_cap_and_max_hours() -> None:
    clock = Clock()
    g = guard(clock)
    clock.now += 1001
    assert g.cap_reached()
    assert "budget" in g.check(step=None, s_per_step=None, save_every=None)
    h = guard(clock, price_per_hour=0.0, max_hours=0.5, started_at=clock.now)
    assert h.check(step=10, s_per_step=1.0, save_every=100) is None
    clock.now += 1790  # next checkpoint (90 s ahead) would pass 30 minutes
    assert "max_hours" in h.check(step=10, s_per_step=1.0, save_every=100)
    clock.now += 10
    assert h.cap_reached()


def test_free_hardware_never_trips_the_budget() -> None:
    clock = Clock()
    g = guard(clock, price_per_hour=0.0)
    clock.now += 10 ** 6
    assert g.check(step=1, s_per_step=100.0, save_every=1000) is None
    assert not g.cap_reached()


class FakeVastHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []
    status_code = 200

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": json.loads(body)})
        self.send_response(type(self).status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"success": true}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def vast_server():
    FakeVastHandler.requests = []
    FakeVastHandler.status_code = 200
    server = HTTPServer(("127.0.0.1", 0), FakeVastHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeVastHandler
    server.shutdown()
    server.server_close()


def make_watchdog(run_dir: Path, clock: Clock, env: dict, *, finished: bool, cap: bool):
    events: list[dict] = []
    stops: list[str] = []
    state = {"finished": finished, "cap": cap}
    dog = Watchdog(run_dir, grace_s=60, env=env, event=lambda kind, **d: events.append(
        {"event": kind, **d}), is_finished=lambda: state["finished"],
        cap_reached=lambda: state["cap"], stop_training=stops.append, clock=clock,
        sleep=lambda s: setattr(clock, "now", clock.now + s), interval_s=30)
    return dog, events, stops, state


def touch(path: Path, when: float) -> None:
    path.touch()
    os.utime(path, (when, when))


def test_watchdog_stops_the_instance_after_a_finished_run(tmp_path: Path, vast_server) -> None:
    url, handler = vast_server
    clock = Clock()
    env = {"CONTAINER_API_KEY": "per-instance-key", "CONTAINER_ID": "4242", "VAST_URL": url}
    dog, events, stops, state = make_watchdog(tmp_path, clock, env, finished=False, cap=False)
    touch(tmp_path / "heartbeat", clock.now)
    clock.now += 120
    assert dog.check_once() is None  # silent, but still training under the cap: nothing to do
    state["finished"] = True
    touch(tmp_path / "heartbeat", clock.now)
    clock.now += 30
    assert dog.check_once() is None  # the controller is alive
    clock.now += 61
    assert dog.check_once() == "stop_instance"
    assert handler.requests == [{"path": "/api/v0/instances/4242/",
                                 "auth": "Bearer per-instance-key", "body": {"state": "stopped"}}]
    assert events[-1]["action"] == "stop_instance" and events[-1]["ok"] is True
    assert dog.check_once() is None  # once only
    assert len(handler.requests) == 1


def test_watchdog_stops_training_at_the_cap_then_the_instance(tmp_path: Path, vast_server) -> None:
    url, handler = vast_server
    clock = Clock()
    env = {"CONTAINER_API_KEY": "k" * 10, "CONTAINER_ID": "7", "VAST_URL": url}
    dog, events, stops, state = make_watchdog(tmp_path, clock, env, finished=False, cap=True)
    clock.now += 61  # no heartbeat file at all: silent since the agent started
    assert dog.check_once() == "stop_training"
    assert len(stops) == 1 and not handler.requests
    assert dog.check_once() is None  # asked once
    state["finished"] = True
    assert dog.wait_for_stop(max_s=600) is True
    assert [e["action"] for e in events] == ["stop_training", "stop_instance"]


def test_watchdog_retries_a_failed_stop(tmp_path: Path, vast_server) -> None:
    url, handler = vast_server
    handler.status_code = 500
    clock = Clock()
    env = {"CONTAINER_API_KEY": "k" * 10, "CONTAINER_ID": "7", "VAST_URL": url}
    dog, events, _, _ = make_watchdog(tmp_path, clock, env, finished=True, cap=False)
    clock.now += 61
    assert dog.check_once() is None
    assert events[-1]["ok"] is False and events[-1]["http_status"] == 500
    handler.status_code = 200
    assert dog.check_once() == "stop_instance"


def test_without_vast_variables_it_only_stops_training(tmp_path: Path) -> None:
    clock = Clock()
    dog, events, stops, state = make_watchdog(tmp_path, clock, {}, finished=False, cap=True)
    assert not dog.can_stop_instance
    assert stop_instance_request({}) is None
    clock.now += 61
    assert dog.check_once() == "stop_training"
    state["finished"] = True
    assert dog.check_once() is None
    assert dog.wait_for_stop() is False
    assert [e["action"] for e in events] == ["stop_training"]


NET_DEV_SAMPLE = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 5000000000  100    0    0    0     0          0         0 5000000000  100    0    0    0     0       0          0
  eth0: 2000000000  300    0    0    0     0          0         0  1000    10    0    0    0     0       0          0
  eth1:  500000000  300    0    0    0     0          0         0  1000    10    0    0    0     0       0          0
"""


def test_received_bytes_count_every_interface_but_loopback(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.write_text(NET_DEV_SAMPLE)  # the layout of proc(5) /proc/net/dev
    assert received_bytes(str(dev)) == 2_500_000_000
    assert received_bytes(str(tmp_path / "missing")) is None


def test_received_traffic_is_billed_and_can_stop_training(tmp_path: Path) -> None:
    # Vast bills what the instance downloads at inet_down_cost $/GB (the weights: ~33 GB)
    counter = {"rx": 1_000}
    rx = ReceivedSince(tmp_path / "rx_base", read=lambda: counter["rx"])
    plan = {"price_per_hour": 1.0, "budget_usd": 5.0, "billing_started_at": 1.0,
            "instance": {"inet_down_cost": 0.05}}
    guard = CostGuard.from_plan(plan, clock=lambda: 3601.0, rx_bytes=rx)
    assert guard.spend() == pytest.approx(1.0)  # the first reading is the base
    counter["rx"] += 33_000_000_000
    assert guard.spend() == pytest.approx(1.0 + 33 * 0.05)
    assert guard.check(step=10, s_per_step=1.0, save_every=100) is None
    counter["rx"] += 50_000_000_000  # another 50 GB: $2.50 more crosses the $5 cap
    assert guard.cap_reached()
    assert "budget $5.00 reached" in guard.check(step=10, s_per_step=1.0, save_every=100)
    # a restarted agent counts from the same base; a restarted container from zero
    again = ReceivedSince(tmp_path / "rx_base", read=lambda: counter["rx"])
    assert again() == 83_000_000_000
    assert ReceivedSince(tmp_path / "rx_base", read=lambda: 7)() == 7


def test_traffic_on_free_traffic_or_without_a_count_costs_nothing(tmp_path: Path) -> None:
    plan = {"price_per_hour": 1.0, "budget_usd": 5.0, "billing_started_at": 1.0, "instance": {}}
    guard = CostGuard.from_plan(plan, clock=lambda: 3601.0, rx_bytes=lambda: 10**12)
    assert guard.spend() == pytest.approx(1.0)
    plan["instance"] = {"inet_down_cost": 0.05}
    assert CostGuard.from_plan(plan, clock=lambda: 3601.0, rx_bytes=lambda: None).spend() == 1.0
