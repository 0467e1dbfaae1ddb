"""``STOP`` with a kind: the controller's cap honours ``budget.on_cap: hard_stop``.

Both sides: the agent's parsing (``remote.stop_request``) and the Runner turning ``kind: hard``
into ``stop_now`` (the same path as its own cost guard, shown against the fake ai-toolkit of
``test_train_supervision.py``); the controller's Follower writing ``hard`` for hard_stop specs and
``graceful`` otherwise, and ``flux-remote stop`` staying graceful.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from controller.run.follow import RunPaths, on_cap_of, request_stop
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from remote.plan import make_plan
from remote.runner import Runner
from remote.status import read_events
from remote.stop_request import DEFAULT_REASON, StopRequest, parse_stop, read_stop
from remote.train import run_training
from tests.test_launch_local import write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider
from tests.test_runner import tiny_spec
from tests.test_train_supervision import Recorder, fake_ctx


# -- the agent's side ----------------------------------------------------------------------------
@pytest.mark.parametrize("content, kind, reason", [
    (b"", "graceful", DEFAULT_REASON),  # `touch STOP`: the original contract
    (b"  \n", "graceful", DEFAULT_REASON),
    (b"stop requested by the user\nmore\n", "graceful", "stop requested by the user"),
    (b'{"kind": "hard", "reason": "controller cost cap"}\n', "hard", "controller cost cap"),
    (b'{"kind": "graceful", "reason": "stop requested by the user"}', "graceful",
     "stop requested by the user"),
    (b'{"kind": "HARD!", "reason": "typo"}', "graceful", "typo"),  # not understood: graceful
    (b'{"kind": "hard"}', "hard", DEFAULT_REASON),
    (b'["hard"]', "graceful", '["hard"]'),  # JSON, but not an object: plain text
    (b'{"kind": "hard", "reas', "graceful", '{"kind": "hard", "reas'),
    (b"\xff\xfe stop", "graceful", "\ufffd\ufffd stop"),
])
def test_parse_stop(content: bytes, kind: str, reason: str) -> None:
    request = parse_stop(content)
    assert (request.kind, request.reason) == (kind, reason)
    assert request.hard is (kind == "hard")


def test_read_stop(tmp_path: Path) -> None:
    assert read_stop(tmp_path) is None
    (tmp_path / "STOP").write_text(StopRequest("hard", "cap").to_json())
    assert read_stop(tmp_path) == StopRequest("hard", "cap")
    (tmp_path / "STOP").unlink()
    (tmp_path / "STOP").mkdir()  # unreadable but there: still a (graceful) stop
    assert read_stop(tmp_path) == StopRequest()


def runner_for(tmp_path: Path) -> Runner:
    """A Runner whose own cost guard never fires (free hardware, on_cap graceful_stop)."""
    plan = make_plan(run_id="r1", spec=tiny_spec(tmp_path), run_dir=str(tmp_path / "run"),
                     dataset_dir=str(tmp_path), provider="local", price_per_hour=0.0)
    return Runner(plan, env={})


@pytest.mark.parametrize("content, hard", [
    (b"", False), (b"stop requested by the user\n", False),
    (b'{"kind": "graceful", "reason": "user"}', False),
    (b'{"kind": "hard", "reason": "controller cost cap"}', True),
])
def test_runner_honours_the_kind_of_stop(tmp_path: Path, content: bytes, hard: bool) -> None:
    runner = runner_for(tmp_path)
    try:
        assert not runner.stop_requested() and not runner.stop_now()
        (runner.run_dir / "STOP").write_bytes(content)
        assert runner.stop_now() is hard  # asked alone, as while waiting for a save
        assert runner.stop_requested()
        assert runner.stop_reason is not None and runner.stop_reason.startswith(
            "hard stop: " if hard else "")
    finally:
        runner.log.close()
    stops = [e for e in read_events(runner.run_dir) if e["event"] == "stop_requested"]
    assert len(stops) == 1


def test_a_hard_stop_after_a_graceful_one_cuts_the_wait_for_the_save(tmp_path: Path) -> None:
    # the user's graceful stop at step 2 waits for the save at 10; the cap's hard STOP at 5 does not
    runner = runner_for(tmp_path / "agent")
    stop = runner.run_dir / "STOP"
    rec = Recorder()

    def on_progress(progress: object) -> None:
        rec.progress.append(progress)
        step = rec.progress[-1].step
        if step >= 2 and not stop.exists():
            stop.write_text("stop requested by the user\n")
        if step >= 5 and "hard" not in stop.read_text():
            request = StopRequest("hard", "controller cost cap")
            stop.write_text(request.to_json())

    ctx = fake_ctx(rec, tmp_path, {}, steps=400, save_every=10, stop_now=runner.stop_now)
    ctx = dataclasses.replace(ctx, stop_requested=runner.stop_requested, on_progress=on_progress)
    try:
        result = run_training(ctx)
    finally:
        runner.log.close()
    assert result.state == "stopped" and rec.checkpoints == [], result.log_tail
    assert 5 <= rec.progress[-1].step < 10
    assert "stopping after the next checkpoint" in rec.text
    assert "not waiting for the next checkpoint" in rec.text
    assert runner.stop_reason == "stop requested by the user"
    log = (runner.run_dir / "agent.log").read_text()
    assert "hard stop requested: controller cost cap" in log


# -- the controller's side -----------------------------------------------------------------------
def capped_run(tmp_path: Path, on_cap: str | None) -> tuple[ScriptedHost, Orchestrator, str]:
    """A run whose metered spend crosses the controller's cap at the first poll; its "agent"
    ends stopped as soon as STOP is written."""
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.files.update({
        f"{run_dir}/status.json": json.dumps({"state": "running", "stage": "train"}).encode()})

    def on_write(h: ScriptedHost, path: str) -> None:
        if path.endswith("/STOP"):
            h.finish(path.rsplit("/", 1)[0], "stopped")

    host.on_write = on_write
    provider = ScriptedProvider(host, price=100.0, started_ago=30.0)  # $0.83 of a $1 budget
    path = write_spec(tmp_path, name="cap", budget=1.0)
    if on_cap:
        data = yaml.safe_load(path.read_text())
        data["budget"]["on_cap"] = on_cap
        path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    orch = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    return host, orch, run_id


def stop_written(host: ScriptedHost) -> bytes:
    (path,) = [p for p in host.files if p.endswith("/STOP")]
    return host.files[path]


@pytest.mark.parametrize("on_cap, kind", [(None, "graceful"), ("graceful_stop", "graceful"),
                                          ("hard_stop", "hard")])
def test_the_controller_cap_writes_the_kind_of_the_spec(tmp_path: Path, on_cap: str | None,
                                                        kind: str) -> None:
    host, orch, run_id = capped_run(tmp_path, on_cap)
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "budget" and outcome.bundle  # the cap ended it; its bundle verified
    request = parse_stop(stop_written(host))
    assert request.kind == kind and request.reason.startswith("controller cost cap")
    (event,) = orch.journal.events(run_id, "cap_stop")
    assert event["detail"]["kind"] == kind


def test_a_user_stop_stays_graceful_on_a_hard_stop_run(tmp_path: Path) -> None:
    host = ScriptedHost()
    request_stop(host, RunPaths("/r/x"), "stop requested by the user")
    assert parse_stop(host.files["/r/x/STOP"]) == StopRequest("graceful",
                                                             "stop requested by the user")
    request_stop(host, RunPaths("/r/x"), "cap", hard=True)
    assert parse_stop(host.files["/r/x/STOP"]).hard


def test_on_cap_of_a_journaled_run() -> None:
    spec = {"budget": {"max_usd": 1, "on_cap": "hard_stop"}}
    assert on_cap_of({"spec_json": json.dumps(spec)}) == "hard_stop"
    assert on_cap_of({"spec_json": json.dumps({"budget": {"max_usd": 1}})}) == "graceful_stop"
    assert on_cap_of({}) == "graceful_stop" and on_cap_of({"spec_json": "not json"}) == \
        "graceful_stop"
