"""``publish.fetch_checkpoints``: each new checkpoint comes home while the run is followed.

One local launch of the tiny trainer (slowed down so that the follower sees its checkpoints)
checks the whole path; the rest drive a ``Follower`` or the orchestrator over the in-memory
``ScriptedHost`` from ``tests.test_resume_gc``, with polls that never wait.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.errors import TransportError
from controller.run.follow import CHECKPOINT_FETCHED, Follower, MachineLost, RunPaths
from controller.journal import Journal, open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from tests.test_launch_local import invoke, write_spec
from tests.test_resume_gc import ScriptedHost, ScriptedProvider

LOST = "instance 7 is 'offline' (host down)"
FETCH_ON = {"publish": {"fetch_checkpoints": True}}


class CountingHost(ScriptedHost):
    """A ScriptedHost that records downloads (but those of ``includes``), fails the first
    ``failures`` of them, and refuses a path it does not hold (as rsync does)."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.downloads: list[str] = []

    def download(self, remote: str, local: Path, *, includes: Any = None,
                 max_bytes: int | None = None) -> Any:
        if includes is not None:
            return super().download(remote, local, includes=includes)
        self.downloads.append(remote)
        if self.failures > 0:
            self.failures -= 1
            raise TransportError("rsync: connection unexpectedly closed")
        prefix = remote.rstrip("/") + "/"
        if remote not in self.files and not any(k.startswith(prefix) for k in self.files):
            raise TransportError(f"rsync: link_stat {remote!r} failed: No such file")
        return super().download(remote, local)


def running_run(journal: Journal, tmp_path: Path, run_id: str) -> str:
    journal.create_run(run_id=run_id, name=run_id, provider="local", state="running", spec={},
                       out_dir=str(tmp_path / "out"), budget_usd=10.0)
    return run_id


def training(host: ScriptedHost, run_dir: str, step: int, checkpoint: str | None, *,
             state: str = "running") -> None:
    """The agent's part: status.json at ``step`` naming ``checkpoint``, which exists on disk."""
    if checkpoint is not None:
        host.files.setdefault(checkpoint, f"lora of {checkpoint}".encode())
    host.files[f"{run_dir}/status.json"] = json.dumps(
        {"state": state, "stage": "train", "step": step, "total": 100,
         "last_checkpoint": checkpoint}).encode()


def follower_of(host: ScriptedHost, journal: Journal, run_id: str, checkpoints: Path | None,
                notes: list[str]) -> Follower:
    follower = Follower(host, RunPaths(f"/r/{run_id}"), journal=journal, run_id=run_id,
                        price_per_hour=0.0, billing_started_at=0.0, budget_usd=10.0,
                        checkpoint_dir=checkpoints, clock=lambda: 100.0, sleep=lambda s: None)
    follower.reporter.note = notes.append  # type: ignore[method-assign]
    return follower


def ckpt(run_id: str, step: int) -> str:
    return f"/r/{run_id}/output/t/t_{step:09d}.safetensors"


def fetched_steps(journal: Journal, run_id: str) -> list[int]:
    return [e["detail"]["step"] for e in journal.events(run_id, kind=CHECKPOINT_FETCHED)]


# -- the whole path: a local launch --------------------------------------------------------------
def test_a_local_launch_keeps_the_newest_checkpoint_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_REMOTE_TINY_STEP_DELAY", "0.25")  # forwarded to the agent
    spec = write_spec(tmp_path, name="ck", steps=12, **FETCH_ON)  # saves at 4, 8, final 12
    out = tmp_path / "out"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1")
    assert result.exit_code == 0, result.output
    journal = open_journal()
    [run] = journal.list_runs()
    events = journal.events(run["run_id"], kind=CHECKPOINT_FETCHED)
    assert events, "no checkpoint was brought home while training"
    steps = [e["detail"]["step"] for e in events]
    assert steps == sorted(set(steps))  # each checkpoint once, in training order
    newest = Path(events[-1]["detail"]["local"])
    assert newest.parent == (out / "checkpoints").resolve()
    assert newest.name == Path(events[-1]["detail"]["path"]).name
    assert list((out / "checkpoints").iterdir()) == [newest]  # the older ones were deleted
    assert newest.stat().st_size > 0
    assert run["state"] == "done"


def test_without_the_option_nothing_is_fetched_while_training(tmp_path: Path) -> None:
    host = CountingHost()

    def start(h: ScriptedHost, run_dir: str) -> None:
        training(h, run_dir, 4, f"{run_dir}/output/f/f_000000004.safetensors")

    host.on_start = start
    provider = ScriptedProvider(host)
    spec = load_spec(write_spec(tmp_path, name="off"))
    assert spec.publish.fetch_checkpoints is False  # the default
    orch = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    orch.drive(run_id, Options(detach=True))
    follower = orch.follower(orch.journal.get_run(run_id), Options(), checkpoints=True)
    follower.poll()
    follower.poll()
    host.finish(orch.journal.get_run(run_id)["remote_run_dir"], "done")
    assert orch.drive(run_id, Options(poll_interval=0)).state == "done"
    assert [path for path in host.downloads if "/output/" in path] == []
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert orch.journal.events(run_id, kind=CHECKPOINT_FETCHED) == []


def test_only_the_follow_loop_fetches_not_a_one_off_status_poll(tmp_path: Path) -> None:
    host = CountingHost()
    host.on_start = lambda h, run_dir: training(h, run_dir, 4,
                                                f"{run_dir}/output/s/s_000000004.safetensors")
    provider = ScriptedProvider(host)
    spec = load_spec(write_spec(tmp_path, name="s", **FETCH_ON))
    orch = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    orch.drive(run_id, Options(detach=True))
    run = orch.journal.get_run(run_id)
    assert orch.follower(run, Options()).checkpoint_dir is None  # as `flux-remote status` polls
    assert orch.follower(run, Options(), checkpoints=True).checkpoint_dir == \
        tmp_path / "out" / "checkpoints"


# -- the follower ------------------------------------------------------------------------------------
def test_each_new_checkpoint_replaces_the_one_brought_home_before(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f1")
    host, notes = CountingHost(), []
    home = tmp_path / "out" / "checkpoints"
    follower = follower_of(host, journal, run_id, home, notes)

    follower.poll()  # no checkpoint yet
    training(host, f"/r/{run_id}", 4, ckpt(run_id, 4))
    follower.poll()
    assert (home / "t_000000004.safetensors").read_bytes() == host.files[ckpt(run_id, 4)]
    follower.poll()  # nothing new: no transfer
    assert host.downloads == [ckpt(run_id, 4)]

    (home / "mine.txt").write_text("the user's own file")
    training(host, f"/r/{run_id}", 9, ckpt(run_id, 8))  # the poll comes a step after the save
    follower.poll()
    assert sorted(p.name for p in home.iterdir()) == ["mine.txt", "t_000000008.safetensors"]
    assert host.downloads == [ckpt(run_id, 4), ckpt(run_id, 8)]
    assert fetched_steps(journal, run_id) == [4, 8]
    [last] = journal.events(run_id, kind=CHECKPOINT_FETCHED)[-1:]
    assert last["detail"] == {"path": ckpt(run_id, 8), "local": str(home / "t_000000008.safetensors"),
                              "step": 8}
    assert sum("t_000000008.safetensors" in n for n in notes) == 1


def test_the_final_lora_takes_the_step_from_status(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f2")
    host = CountingHost()
    follower = follower_of(host, journal, run_id, tmp_path / "ck", [])
    training(host, f"/r/{run_id}", 12, f"/r/{run_id}/output/t/t.safetensors")
    follower.poll()
    assert fetched_steps(journal, run_id) == [12]
    assert (tmp_path / "ck" / "t.safetensors").is_file()


def test_a_failed_download_is_tried_again_at_the_next_poll(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f3")
    host, notes = CountingHost(failures=2), []
    home = tmp_path / "out" / "checkpoints"
    follower = follower_of(host, journal, run_id, home, notes)
    training(host, f"/r/{run_id}", 4, ckpt(run_id, 4))

    follower.poll()  # fails: not raised, not remembered
    assert host.downloads == [ckpt(run_id, 4)]
    assert fetched_steps(journal, run_id) == [] and not (home / "t_000000004.safetensors").exists()
    follower.poll()  # fails again: one attempt per poll, still one note
    assert host.downloads == [ckpt(run_id, 4)] * 2
    assert sum("could not bring" in n for n in notes) == 1
    follower.poll()
    assert host.downloads == [ckpt(run_id, 4)] * 3
    assert fetched_steps(journal, run_id) == [4]
    assert (home / "t_000000004.safetensors").is_file()
    follower.poll()
    assert len(host.downloads) == 3


def test_a_failed_download_keeps_the_older_checkpoint_home(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f4")
    host = CountingHost()
    home = tmp_path / "ck"
    follower = follower_of(host, journal, run_id, home, [])
    training(host, f"/r/{run_id}", 4, ckpt(run_id, 4))
    follower.poll()
    host.failures = 1
    training(host, f"/r/{run_id}", 8, ckpt(run_id, 8))
    follower.poll()
    assert [p.name for p in home.iterdir()] == ["t_000000004.safetensors"]
    follower.poll()
    assert [p.name for p in home.iterdir()] == ["t_000000008.safetensors"]


def test_nothing_is_fetched_once_the_agent_has_ended(tmp_path: Path) -> None:
    journal = open_journal()
    for run_id, ended in (("f5", "rc"), ("f6", "state")):
        running_run(journal, tmp_path, run_id)
        host = CountingHost()
        follower = follower_of(host, journal, run_id, tmp_path / run_id, [])
        training(host, f"/r/{run_id}", 12, ckpt(run_id, 12),
                 state="done" if ended == "state" else "running")
        if ended == "rc":
            host.files[f"/r/{run_id}/agent.rc"] = b"0\n"
        follower.poll()
        assert host.downloads == [], ended
        assert not (tmp_path / run_id).exists()


def test_a_new_follower_knows_what_is_home_already(tmp_path: Path) -> None:
    """A controller that reattaches (``resume``) neither fetches the same checkpoint again nor
    leaves the one an earlier controller brought home beside the next."""
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f7")
    host = CountingHost()
    home = tmp_path / "ck"
    training(host, f"/r/{run_id}", 4, ckpt(run_id, 4))
    follower_of(host, journal, run_id, home, []).poll()
    again = follower_of(host, journal, run_id, home, [])
    again.poll()
    assert host.downloads == [ckpt(run_id, 4)]
    training(host, f"/r/{run_id}", 8, ckpt(run_id, 8))
    again.poll()
    assert [p.name for p in home.iterdir()] == ["t_000000008.safetensors"]


def test_the_download_is_metered_as_bandwidth(tmp_path: Path) -> None:
    journal = open_journal()
    run_id = running_run(journal, tmp_path, "f8")
    host = CountingHost()
    follower = Follower(host, RunPaths(f"/r/{run_id}"), journal=journal, run_id=run_id,
                        price_per_hour=0.0, billing_started_at=0.0, budget_usd=10.0,
                        checkpoint_dir=tmp_path / "ck", transfer_cost=lambda stats: 0.25,
                        clock=lambda: 100.0, sleep=lambda s: None)
    training(host, f"/r/{run_id}", 4, ckpt(run_id, 4))
    follower.poll()
    assert follower.bandwidth_usd == 0.25
    assert follower.poll().spend_usd == 0.25


# -- the lost machine ---------------------------------------------------------------------------------
def lost_after_first_fetch(tmp_path: Path, name: str, **extra: Any) -> tuple[Orchestrator, str]:
    """A run whose agent reports a checkpoint; the host dies at the end of the second poll (the
    first brought the checkpoint home) and the provider says it is offline."""
    host = CountingHost()
    host.on_start = lambda h, run_dir: training(h, run_dir, 9,
                                                f"{run_dir}/output/{name}/{name}_000000008"
                                                f".safetensors")
    provider = ScriptedProvider(host)
    provider.problem = LOST
    spec = load_spec(write_spec(tmp_path, name=name, **extra))
    orch = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    orch.drive(run_id, Options(detach=True))
    beats: list[str] = []

    def on_write(h: ScriptedHost, path: str) -> None:
        beats.extend([path] if path.endswith("/heartbeat") else [])
        h.down = len(beats) >= 2

    host.on_write = on_write
    return orch, run_id


def test_a_lost_machine_names_the_checkpoint_at_home_and_how_to_resume(tmp_path: Path) -> None:
    orch, run_id = lost_after_first_fetch(tmp_path, "lost", **FETCH_ON)
    with pytest.raises(MachineLost) as info:
        orch.drive(run_id, Options(poll_interval=0))
    local = tmp_path / "out" / "checkpoints" / "lost_000000008.safetensors"
    assert local.is_file()
    message = str(info.value)
    dataset = (tmp_path / "data").resolve()
    assert "offline" in message and f"flux-remote fetch {run_id}" in message
    assert str(local) in message and "(step 8)" in message
    assert f"copy it into the dataset folder {dataset}" in message
    assert "training.resume_from_checkpoint: lost_000000008.safetensors" in message
    run = orch.journal.get_run(run_id)
    assert run["state"] == "failed" and run["error"] == message


def test_a_lost_machine_without_a_checkpoint_home_says_only_how_to_fetch(tmp_path: Path) -> None:
    orch, run_id = lost_after_first_fetch(tmp_path, "bare")
    with pytest.raises(MachineLost) as info:
        orch.drive(run_id, Options(poll_interval=0))
    message = str(info.value)
    assert f"flux-remote fetch {run_id}" in message
    assert "resume_from_checkpoint" not in message
    assert not (tmp_path / "out" / "checkpoints").exists()
