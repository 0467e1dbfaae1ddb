"""A dead host is noticed while SSH reconnects, and the hard cap reserves only what it needs.

``SshHost``'s reconnect loop asks its ``give_up`` hook (the provider's health, wired by the
orchestrator while it follows a run) at most every ``GIVE_UP_EVERY_S``: a machine the provider
reports gone ends the loop at once (``Unreachable.problem``) and the follower turns that into
``MachineLost``; None or a ProviderError keeps reconnecting for the whole window. The reconnect
tests run against a local port nobody listens on (refused at once) with a fake clock, so no test
waits out a real backoff. The cap tests drive ``Follower.poll`` with an in-memory host and clock.
"""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from typing import Any, Iterator

import paramiko
import pytest

from controller.errors import ProviderError
from controller.run.follow import (FINISH_ALLOWANCE_S, HARD_FINISH_ALLOWANCE_S, Follower,
                               MachineLost, RunPaths)
from controller.hosts.ssh import GIVE_UP_EVERY_S, SshHost, SshTarget, Unreachable
from controller.journal import Journal, open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from remote.stop_request import parse_stop
from tests.faults import FakeClock
from tests.test_launch_local import write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider

WINDOW_S = 120.0
LOST = "instance 7 is 'offline' (host down)"


class Hook:
    """A give_up hook playing back ``answers`` (the last one repeats); records when it was asked.
    An answer that is an exception is raised."""

    def __init__(self, fake: FakeClock, *answers: str | None | Exception) -> None:
        self.fake = fake
        self.answers = list(answers)
        self.asked_at: list[float] = []

    def __call__(self) -> str | None:
        self.asked_at.append(self.fake.now)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    """A key SshHost can load (it loads it before connecting); no server ever sees it."""
    path = tmp_path / "id_ecdsa"
    paramiko.ECDSAKey.generate().write_private_key_file(str(path))
    return path


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def fake() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dead_host(tmp_path: Path, client_key: Path, dead_port: int,
              fake: FakeClock) -> Iterator[SshHost]:
    target = SshTarget("127.0.0.1", dead_port, "nobody", client_key, tmp_path / "known_hosts")
    with SshHost(target, connect_timeout=5.0, reconnect_window_s=WINDOW_S, sleep=fake.sleep,
                 clock=fake) as host:
        yield host


def assert_spaced(asked_at: list[float]) -> None:
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:])]
    assert all(gap >= GIVE_UP_EVERY_S for gap in gaps), gaps


# -- the reconnect loop ----------------------------------------------------------------------------
def test_a_hook_that_reports_the_machine_lost_ends_the_reconnect_well_before_the_window(
        dead_host: SshHost, fake: FakeClock) -> None:
    hook = Hook(fake, None, None, LOST)
    dead_host.give_up = hook  # settable after construction
    with pytest.raises(Unreachable) as info:
        dead_host.connect()
    assert info.value.problem == LOST and LOST in str(info.value)
    assert len(hook.asked_at) == 3
    assert_spaced(hook.asked_at)
    assert fake.slept < WINDOW_S / 2  # not the whole window
    assert len(fake.sleeps) > len(hook.asked_at)  # asked between attempts, not at every one
    assert dead_host.connects == 0


def test_a_hook_returning_none_keeps_reconnecting_until_the_window(
        dead_host: SshHost, fake: FakeClock) -> None:
    hook = Hook(fake, None)
    dead_host.give_up = hook
    with pytest.raises(Unreachable) as info:
        dead_host.connect()
    assert info.value.problem is None
    assert fake.slept >= WINDOW_S
    assert_spaced(hook.asked_at)
    assert WINDOW_S / GIVE_UP_EVERY_S - 1 <= len(hook.asked_at) <= WINDOW_S / GIVE_UP_EVERY_S + 1


def test_a_hook_raising_provider_error_is_unsure_and_keeps_reconnecting(
        dead_host: SshHost, fake: FakeClock) -> None:
    dead_host.give_up = Hook(fake, ProviderError("Vast API: 502"))
    with pytest.raises(Unreachable) as info:
        dead_host.connect()
    assert info.value.problem is None and fake.slept >= WINDOW_S

    # unsure first, then sure: the loop ends at the first answer
    fake.sleeps.clear()
    hook = Hook(fake, ProviderError("Vast API: 502"), ProviderError("Vast API: 502"), LOST)
    dead_host.give_up = hook
    with pytest.raises(Unreachable) as info:
        dead_host.connect()
    assert info.value.problem == LOST and len(hook.asked_at) == 3
    assert fake.slept < WINDOW_S / 2


def test_the_hook_can_be_given_at_construction(tmp_path: Path, client_key: Path, dead_port: int,
                                               fake: FakeClock) -> None:
    target = SshTarget("127.0.0.1", dead_port, "nobody", client_key, tmp_path / "known_hosts")
    hook = Hook(fake, LOST)
    with SshHost(target, reconnect_window_s=WINDOW_S, sleep=fake.sleep, clock=fake,
                 give_up=hook) as host, pytest.raises(Unreachable) as info:
        host.connect()
    assert info.value.problem == LOST and hook.asked_at == [1000.0] and fake.slept == 0


# -- the follower and the orchestrator -----------------------------------------------------------
def running_run(journal: Journal, tmp_path: Path, run_id: str = "r1", **spec: Any) -> str:
    journal.create_run(run_id=run_id, name=run_id, provider="vast", state="running", spec=spec,
                       out_dir=str(tmp_path / "out"), budget_usd=10.0)
    return run_id


def test_the_follower_turns_a_lost_machine_from_the_reconnect_into_machine_lost(
        tmp_path: Path, dead_host: SshHost, fake: FakeClock) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path)
    health = Hook(fake, LOST)
    dead_host.give_up = health
    follower = Follower(dead_host, RunPaths("/r/r1"), journal=journal, run_id=run_id,
                        price_per_hour=1.0, billing_started_at=0.0, budget_usd=10.0,
                        health=health, sleep=lambda s: None)
    with pytest.raises(MachineLost, match="offline"):
        follower.follow()
    (event,) = journal.events(run_id, "machine_lost")
    assert event["detail"]["problem"] == LOST
    assert len(health.asked_at) == 1  # the reconnect's answer is used, not asked again


def test_the_orchestrator_wires_the_provider_health_into_the_ssh_reconnect(
        tmp_path: Path, client_key: Path, dead_port: int, fake: FakeClock) -> None:
    scripted = ScriptedHost()
    launcher = ScriptedProvider(scripted)
    spec = load_spec(write_spec(tmp_path, name="lost"))
    journal = open_journal()
    first = Orchestrator(journal, launcher, sleep=lambda s: None)
    run_id = first.create_run(spec, launcher.estimate(spec), out_dir=tmp_path / "out")
    first.drive(run_id, Options(detach=True))  # shipped, agent started: `running`

    # a later controller reattaches over SSH to a host that died meanwhile
    target = SshTarget("127.0.0.1", dead_port, "nobody", client_key, tmp_path / "known_hosts")
    ssh = SshHost(target, reconnect_window_s=WINDOW_S, sleep=fake.sleep, clock=fake)
    provider = ScriptedProvider(ssh)  # type: ignore[arg-type]
    asked: list[str] = []

    def health(run_id: str, journal: Any) -> str | None:
        asked.append(run_id)
        return LOST

    provider.health = health  # type: ignore[method-assign]
    with pytest.raises(MachineLost, match="offline"):
        Orchestrator(journal, provider, sleep=lambda s: None).drive(run_id,
                                                                    Options(poll_interval=0))
    assert fake.slept < WINDOW_S / 2  # noticed by the reconnect loop, not after its window
    assert asked == [run_id]
    assert [e["detail"]["problem"] for e in journal.events(run_id, "machine_lost")] == [LOST]
    run = journal.get_run(run_id)
    assert run["state"] == "failed" and f"flux-remote fetch {run_id}" in run["error"]
    assert provider.released == [True]  # stopped (data kept), not destroyed
    assert ssh.give_up is None  # only for the duration of the follow


# -- the controller's hard cap ---------------------------------------------------------------------
PRICE = 36.0  # $/h: one cent a second
BUDGET = 10.0  # reached 1000 s after billing started
RUN_NUMBERS = itertools.count(1)


def cap_follower(tmp_path: Path, now: list[float], on_cap: str,
                 **options: Any) -> tuple[ScriptedHost, Follower, Journal]:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, run_id=f"cap-{next(RUN_NUMBERS)}")
    host = ScriptedHost()
    follower = Follower(host, RunPaths(f"/r/{run_id}"), journal=journal, run_id=run_id,
                        price_per_hour=PRICE, billing_started_at=0.0, budget_usd=BUDGET,
                        poll_interval=2.0, on_cap=on_cap, clock=lambda: now[0],
                        sleep=lambda s: None, **options)
    return host, follower, journal


def first_stop_at(tmp_path: Path, on_cap: str, **options: Any) -> tuple[float, str]:
    """Poll every 10 s of billed time; when STOP was first written, and its kind."""
    now = [0.0]
    host, follower, journal = cap_follower(tmp_path, now, on_cap, **options)
    stop = follower.paths.stop
    while stop not in host.files:
        assert now[0] < 3600, "the cap never fired"
        now[0] += 10.0
        follower.poll()
    (event,) = journal.events(follower.run_id, "cap_stop")
    assert event["detail"]["kind"] == parse_stop(host.files[stop]).kind
    return now[0], parse_stop(host.files[stop]).kind


def test_the_hard_cap_reserves_less_than_the_graceful_one(tmp_path: Path) -> None:
    graceful_at, graceful = first_stop_at(tmp_path, "graceful_stop")
    hard_at, hard = first_stop_at(tmp_path, "hard_stop")
    assert (graceful, hard) == ("graceful", "hard")
    budget_at = BUDGET / PRICE * 3600
    # each fires once the spend plus the next poll and its finish would reach the budget
    assert budget_at - FINISH_ALLOWANCE_S - 2 <= graceful_at < budget_at - FINISH_ALLOWANCE_S + 10
    assert budget_at - HARD_FINISH_ALLOWANCE_S - 2 <= hard_at < \
        budget_at - HARD_FINISH_ALLOWANCE_S + 10
    assert hard_at > graceful_at + 300  # the hard cap lets training run minutes longer


def test_an_explicit_smaller_allowance_is_kept_for_a_hard_cap(tmp_path: Path) -> None:
    small = 60.0
    hard_at, kind = first_stop_at(tmp_path, "hard_stop", finish_allowance_s=small)
    budget_at = BUDGET / PRICE * 3600
    assert kind == "hard" and budget_at - small - 2 <= hard_at < budget_at - small + 10
    # a larger explicit allowance is capped to the hard one
    big_at, _ = first_stop_at(tmp_path, "hard_stop", finish_allowance_s=900.0)
    assert big_at >= budget_at - HARD_FINISH_ALLOWANCE_S - 2


def test_the_hard_time_cap_reserves_less_too(tmp_path: Path) -> None:
    def time_cap_at(on_cap: str) -> float:
        now = [0.0]
        journal = open_journal()
        run_id = running_run(journal, tmp_path, run_id=f"time-{on_cap}")
        host = ScriptedHost()
        follower = Follower(host, RunPaths(f"/r/{run_id}"), journal=journal, run_id=run_id,
                            price_per_hour=0.0, billing_started_at=0.0, budget_usd=BUDGET,
                            max_hours=1.0, poll_interval=2.0, on_cap=on_cap,
                            clock=lambda: now[0], sleep=lambda s: None)
        while not follower.poll().stop_requested:
            assert now[0] < 7200, "the time cap never fired"
            now[0] += 10.0
        assert json.loads(host.files[follower.paths.stop])["reason"].startswith(
            "controller time cap")
        return now[0]

    assert time_cap_at("graceful_stop") < 3600 - FINISH_ALLOWANCE_S + 10
    assert time_cap_at("hard_stop") >= 3600 - HARD_FINISH_ALLOWANCE_S - 2


def test_the_hard_cap_is_read_from_the_journaled_spec(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, run_id="spec-hard",
                         budget={"max_usd": BUDGET, "on_cap": "hard_stop"})
    follower = Follower(ScriptedHost(), RunPaths("/r/spec-hard"), journal=journal, run_id=run_id,
                        price_per_hour=PRICE, billing_started_at=0.0, budget_usd=BUDGET)
    assert follower.hard_cap and follower.finish_allowance_s == HARD_FINISH_ALLOWANCE_S


def test_an_agent_that_ends_between_the_reads_is_ended_not_vanished(tmp_path: Path) -> None:
    """The exit code is read first, then the pid's life: an agent that ends in between is dead
    by the second read, and its exit code (written before its session ends) is there for a
    second look. Without it the run believed the agent vanished and started it again."""
    from controller.journal import open_journal
    from controller.run.follow import Follower, RunPaths
    from tests.test_resume_gc import ScriptedHost

    class EndsBetweenReads(ScriptedHost):
        def is_alive(self, pid: int) -> bool:
            self.files[paths.rc] = b"0\n"  # the agent ended just now
            return False

    paths = RunPaths("/r/x")
    host = EndsBetweenReads()
    host.files[paths.pid] = b"4242\n"
    journal = open_journal()
    journal.create_run(run_id="x", name="x", provider="ssh", state="running", spec={},
                       out_dir=str(tmp_path / "out"), budget_usd=1.0)
    follower = Follower(host, paths, journal=journal, run_id="x", price_per_hour=0.0,
                        billing_started_at=0.0, budget_usd=1.0, clock=lambda: 1.0,
                        sleep=lambda s: None)
    snap = follower.poll()
    assert snap.agent_alive is False and snap.agent_rc == 0
