"""Resume, reconcile, gc and the money rules at the edges.

Fast tests drive the orchestrator with an in-memory host whose "agent" is a script; the slow
ones kill a real controller with SIGKILL mid-training (FakeVast + a real sshd) and resume it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pytest

from controller.errors import RunError, TransportError
from controller.run.follow import RunPaths
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.providers.base import (Estimate, Machine, claim_own_machine,
                                       own_machine_row, release_own_machine)
from controller.spec.loader import load_spec
from controller.vast.client import VastClient
from tests.test_launch_local import invoke, write_spec
from tests.test_launch_vast_e2e import NO_WAIT, vast_provider, vast_spec


class ScriptedHost:
    """An in-memory Host. ``on_start`` / ``on_write`` play the agent's part."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.commands: list[str] = []
        self.alive: set[int] = set()
        self.on_start: Callable[["ScriptedHost", str], None] = lambda host, run_dir: None
        self.on_write: Callable[["ScriptedHost", str], None] = lambda host, path: None
        self.started = 0
        self.down = False  # the connection fails while set

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float | None = None,
            check: bool = True) -> Any:
        self.commands.append(command)
        return None

    def read_bytes(self, path: str, offset: int = 0, limit: int | None = None) -> bytes | None:
        if self.down:
            raise TransportError("connection refused")
        data = self.files.get(path)
        if data is None:
            prefix = path.rstrip("/") + "/"
            return b"" if any(k.startswith(prefix) for k in self.files) else None
        return data[offset: None if limit is None else offset + limit]

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self.files[path] = data
        self.modes[path] = mode
        self.on_write(self, path)

    def start_detached(self, argv: list[str], *, cwd: str, log_path: str,
                       env: dict[str, str] | None = None, pid_path: str, rc_path: str) -> int:
        self.started += 1
        self.files[pid_path] = b"4242\n"
        self.alive.add(4242)
        self.on_start(self, cwd)
        return 4242

    def is_alive(self, pid: int) -> bool:
        return pid in self.alive

    def upload(self, local: Path, remote: str, *, delete: bool = False, excludes: Any = (),
               filters: Any = ()) -> Any:
        return _Stats()

    def download(self, remote: str, local: Path, *, includes: Any = None,
                 max_bytes: int | None = None) -> Any:
        prefix = remote.rstrip("/") + "/"
        if includes is not None:  # only those entries of the directory
            for name in includes:
                self.download(prefix + name, local / name)
            return _Stats()
        if remote in self.files:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.files[remote])
        for path, data in self.files.items():
            if path.startswith(prefix):
                target = local / PurePosixPath(path[len(prefix):])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return _Stats()

    def close(self) -> None:
        return None

    # the agent's side
    def finish(self, run_dir: str, state: str, *, good_sums: bool = True) -> None:
        lora = b"weights"
        digest = hashlib.sha256(lora if good_sums else b"other").hexdigest()
        self.files[f"{run_dir}/publish/x.safetensors"] = lora
        self.files[f"{run_dir}/publish/SHA256SUMS"] = f"{digest}  x.safetensors\n".encode()
        self.files[f"{run_dir}/agent.log"] = b"step 1\nstep 2\n"
        self.files[f"{run_dir}/status.json"] = json.dumps(
            {"state": state, "stage": "publish", "step": 2, "total": 2, "s_per_step": 1.5,
             "stages": {"train": {"ended_at": time.time()}}}).encode()
        self.files[f"{run_dir}/agent.rc"] = b"0\n"
        self.alive.clear()


class _Stats:
    bytes_sent = 0

    def to_dict(self) -> dict[str, int]:
        return {"bytes_sent": 0}


class ScriptedProvider:
    """Own-hardware-like provider over a ScriptedHost; records releases."""

    name = "local"

    def __init__(self, host: ScriptedHost, *, price: float = 0.0, started_ago: float = 0.0) -> None:
        self.host = host
        self.price = price
        self.started_ago = started_ago
        self.released: list[bool] = []
        self.handed_over: list[tuple[str, str]] = []
        self.problem: str | None = None

    def estimate(self, spec: Any) -> Estimate:
        return Estimate(provider=self.name, price_per_hour=self.price, est_usd=0.1, est_hours=0.1,
                        gpu_name="RTX 4090")

    def acquire(self, run_id: str, spec: Any, estimate: Estimate, journal: Any, notify: Any) -> Machine:
        row, started = claim_own_machine(journal, run_id, provider=self.name, name="scripted",
                                         price_per_hour=self.price,
                                         clock=lambda: time.time() - self.started_ago)
        return Machine(host=self.host, root="/r", python="python3", price_per_hour=self.price,
                       billing_started_at=started, instance_row=row,
                       info={"gpu_name": "RTX 4090"})

    def reattach(self, run_id: str, spec: Any, journal: Any) -> Machine:
        row, started = own_machine_row(journal, run_id)
        return Machine(host=self.host, root="/r", python="python3", price_per_hour=self.price,
                       billing_started_at=started, instance_row=row,
                       info={"gpu_name": "RTX 4090"})

    def release(self, run_id: str, journal: Any, *, keep_data: bool = False) -> None:
        self.released.append(keep_data)
        if not keep_data:
            release_own_machine(journal, run_id)

    def hand_over(self, run_id: str, to_run_id: str, journal: Any) -> int:
        self.handed_over.append((run_id, to_run_id))
        return journal.hand_over_instance(int(journal.current_instance(run_id)["id"]), to_run_id)

    def health(self, run_id: str, journal: Any) -> str | None:
        return self.problem

    def reconcile(self, journal: Any) -> list[str]:
        return []

    def orphans(self, journal: Any) -> list[dict[str, Any]]:
        return []

    def destroy_orphan(self, instance: dict[str, Any], journal: Any) -> None:
        return None


def _orchestrate(tmp_path: Path, provider: ScriptedProvider) -> tuple[Orchestrator, str]:
    spec = load_spec(write_spec(tmp_path, name="f1"))
    orch = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    return orch, run_id


def test_unverifiable_bundle_stops_instead_of_destroying(tmp_path: Path) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.finish(run_dir, "done", good_sums=False)
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    with pytest.raises(RunError) as info:
        orch.drive(run_id, Options(poll_interval=0))
    message = str(info.value)
    assert f"flux-remote fetch {run_id}" in message and f"flux-remote down {run_id}" in message
    assert "checksum differs" in message
    assert provider.released == [True]  # stopped (keep data), never destroyed
    assert orch.journal.get_run(run_id)["state"] == "failed"


def test_controller_cap_writes_stop_and_the_run_ends_budget(tmp_path: Path) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.files.update({
        f"{run_dir}/status.json": json.dumps({"state": "running", "stage": "train"}).encode()})

    def on_write(h: ScriptedHost, path: str) -> None:
        if path.endswith("/STOP"):
            h.finish(path.rsplit("/", 1)[0], "stopped")

    host.on_write = on_write
    provider = ScriptedProvider(host, price=100.0, started_ago=30.0)  # $0.83 of a $1 budget
    orch, run_id = _orchestrate(tmp_path, provider)
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "budget" and outcome.bundle  # what fitted, verified
    events = [e["kind"] for e in orch.journal.events(run_id)]
    assert "cap_stop" in events
    assert provider.released == [False]
    assert orch.journal.measured_s_per_step() == {"RTX 4090": 1.5}


def test_secrets_go_to_a_0600_file_outside_the_run_dir_and_are_removed(tmp_path: Path) -> None:
    host = ScriptedHost()
    host.on_start = lambda h, run_dir: h.finish(run_dir, "done")
    provider = ScriptedProvider(host)
    spec = load_spec(write_spec(tmp_path, name="f2"))
    orch = Orchestrator(open_journal(), provider, env={"HF_TOKEN": "hf_canary_abcdef"})
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    assert orch.drive(run_id, Options(poll_interval=0)).state == "done"
    plan = json.loads(host.files[f"/r/{run_id}/plan.json"])
    secrets = plan["secrets_file"]
    assert secrets == f"/r/.secrets/{run_id}.env"
    assert host.files[secrets] == b"HF_TOKEN=hf_canary_abcdef\n" and host.modes[secrets] == 0o600
    assert "hf_canary_abcdef" not in json.dumps(plan)
    assert any(secrets in c and c.startswith("rm -f") for c in host.commands)
    assert "hf_canary_abcdef" not in orch.journal.path.read_bytes().decode("latin-1")


def test_resume_does_not_start_the_agent_twice(tmp_path: Path) -> None:
    host = ScriptedHost()
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    assert orch.drive(run_id, Options(detach=True)).detached
    assert host.started == 1
    # A new controller process (new orchestrator) reattaches; the agent is still alive.
    orch2 = Orchestrator(open_journal(), provider, sleep=lambda s: None)
    orch2.journal.update_run(run_id, state="shipping")  # as if killed while shipping
    host.on_write = lambda h, path: None
    assert orch2.drive(run_id, Options(detach=True)).detached
    assert host.started == 1
    host.finish(orch2.journal.get_run(run_id)["remote_run_dir"], "done")
    outcome = orch2.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "done"
    assert provider.released == [False]


def test_log_lines_are_shown_once_across_controllers(tmp_path: Path) -> None:
    host = ScriptedHost()
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    orch.drive(run_id, Options(detach=True))
    paths = RunPaths(orch.journal.get_run(run_id)["remote_run_dir"])
    host.files[paths.log] = b"one\ntwo\nhal"
    follower = orch.follower(orch.journal.get_run(run_id), Options())
    seen: list[str] = []
    follower.reporter.log = seen.extend  # type: ignore[method-assign]
    follower.poll()
    host.files[paths.log] += b"f\nthree\r\nbar 10%\rbar 20%\n"
    follower2 = Orchestrator(open_journal(), provider).follower(
        orch.journal.get_run(run_id), Options())
    follower2.reporter.log = seen.extend  # type: ignore[method-assign]
    follower2.poll()
    assert seen == ["one", "two", "half", "three", "bar 20%"]


def _labelled_instance(fake: Any, label: str) -> int:
    client = VastClient(base_url=fake.url, api_key=fake.api_key, min_intervals=NO_WAIT,
                        sleep=lambda s: None)
    offer = fake.offers[0]
    return client.create_instance(int(offer["id"]), image="img", disk_gb=10, label=label)


def test_reconcile_settles_a_crash_between_intent_and_result(tmp_path: Path, fake_vast: Any,
                                                             sshd: Any) -> None:
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    for run_id in ("r-made", "r-never"):
        journal.create_run(run_id=run_id, name="r", provider="vast", state="renting", spec={},
                           out_dir=str(tmp_path), budget_usd=1)
    made = journal.instance_intent("r-made", provider="vast", label="flux-remote:r-made")
    never = journal.instance_intent("r-never", provider="vast", label="flux-remote:r-never")
    iid = _labelled_instance(fake_vast, "flux-remote:r-made")
    journal.create_run(run_id="r-dying", name="r", provider="vast", state="fetching", spec={},
                       out_dir=str(tmp_path), budget_usd=1)
    dying = journal.instance_intent("r-dying", provider="vast", label="flux-remote:r-dying")
    dying_id = _labelled_instance(fake_vast, "flux-remote:r-dying")
    journal.instance_created(dying, dying_id)
    journal.destroy_intent(dying)  # ... and the controller died before the result
    lines = provider.reconcile(journal)
    assert len(lines) == 3
    assert journal.get_instance(dying)["state"] == "destroyed"
    assert dying_id not in fake_vast.instances
    assert journal.get_instance(made)["state"] == "live"
    assert journal.get_instance(made)["instance_id"] == str(iid)
    assert journal.get_instance(never)["state"] == "failed"
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 2  # ours; reconciling never creates
    assert provider.orphans(journal) == []  # the live run owns it


def test_gc_destroys_only_orphans(tmp_path: Path, fake_vast: Any) -> None:
    journal = open_journal()
    journal.create_run(run_id="owner", name="o", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path), budget_usd=1)
    owned = _labelled_instance(fake_vast, "flux-remote:owner")
    row = journal.instance_intent("owner", provider="vast", label="flux-remote:owner")
    journal.instance_created(row, owned)
    orphan = _labelled_instance(fake_vast, "flux-remote:ghost-20260101-000000-beef")
    foreign = _labelled_instance(fake_vast, "someone-else")

    result = invoke("gc", "--json")
    listed = json.loads(result.output)
    assert [o["instance_id"] for o in listed["orphans"]] == [orphan]
    assert listed["destroyed"] == []
    result = invoke("gc", "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert [o["instance_id"] for o in json.loads(result.output)["destroyed"]] == [orphan]
    assert set(fake_vast.instances) == {owned, foreign}
    kinds = [e["kind"] for e in journal.events()]
    assert kinds.index("gc_destroy_intent") < kinds.index("gc_destroy_result")


def test_gc_without_vast_key_or_runs_is_quiet() -> None:
    result = invoke("gc", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["orphans"] == []


@pytest.mark.ssh
@pytest.mark.slow
def test_resume_after_sigkill_mid_training(tmp_path: Path, fake_vast: Any, sshd: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    fake_vast.loading_polls = 0
    home = Path(os.environ["FLUX_REMOTE_HOME"])
    (home / "ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(sshd.key_path, home / "ssh" / "id_ed25519")
    shutil.copy(f"{sshd.key_path}.pub", home / "ssh" / "id_ed25519.pub")
    os.chmod(home / "ssh" / "id_ed25519", 0o600)
    spec = vast_spec(tmp_path, name="k1", steps=24)
    out = tmp_path / "bundle"
    env = {**os.environ, "FLUX_REMOTE_TINY_STEP_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "controller", "launch", str(spec), "--yes",
                             "--out", str(out), "--poll-interval", "0.2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = open_journal()
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline:
        runs = journal.list_runs()
        run = runs[0] if runs else None
        if run and run["state"] == "running" and (run["step"] or 0) >= 2:
            break
        assert proc.poll() is None, "the controller ended before training started"
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training never started")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run is not None and journal.get_run(run["run_id"])["state"] == "running"
    assert len(fake_vast.instances) == 1

    result = invoke("resume", run["run_id"], "--yes", "--json", "--poll-interval", "0.2")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output)
    assert outcome["state"] == "done"
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1
    assert fake_vast.instances == {}
    assert (out / "SHA256SUMS").exists()
    [inst] = journal.instances(run["run_id"])
    assert inst["state"] == "destroyed"
    # a second resume is a no-op: nothing destroyed twice
    again = invoke("resume", run["run_id"], "--yes", "--json")
    assert json.loads(again.output)["state"] == "done"
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1


def test_a_run_whose_machine_vanished_keeps_only_its_own_bundle(tmp_path: Path) -> None:
    host = ScriptedHost()
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    orch.drive(run_id, Options(detach=True))
    out = Path(orch.journal.get_run(run_id)["out_dir"])
    out.mkdir(parents=True)
    (out / "receipt.json").write_text(json.dumps({"run_id": "an-older-run"}))
    digest = hashlib.sha256((out / "receipt.json").read_bytes()).hexdigest()
    (out / "SHA256SUMS").write_text(f"{digest}  receipt.json\n")
    release_own_machine(orch.journal, run_id)  # gone behind our back
    outcome = orch.drive(run_id, Options(poll_interval=0))
    assert outcome.state == "failed" and "no verified bundle" in (outcome.error or "")


def test_vast_keep_data_stops_and_gc_keeps_the_stopped_instance(tmp_path: Path, fake_vast: Any,
                                                                 sshd: Any) -> None:
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    journal.create_run(run_id="kept", name="k", provider="vast", state="failed", spec={},
                       out_dir=str(tmp_path), budget_usd=1)
    iid = _labelled_instance(fake_vast, "flux-remote:kept")
    row = journal.instance_intent("kept", provider="vast", label="flux-remote:kept")
    journal.instance_created(row, iid)
    provider.release("kept", journal, keep_data=True)
    assert fake_vast.instances[iid]["actual_status"] == "exited"  # Vast never says "stopped"
    assert journal.get_instance(row)["state"] == "stopped"
    assert provider.orphans(journal) == []
    provider.release("kept", journal)  # `down` later
    assert iid not in fake_vast.instances
    assert journal.get_instance(row)["state"] == "destroyed"
    provider.release("kept", journal)  # idempotent
    assert len(fake_vast.calls("DELETE", "/api/v0/instances/")) == 1


def test_a_lost_machine_ends_the_follow_at_once(tmp_path: Path) -> None:
    from controller.run.follow import MachineLost

    host = ScriptedHost()
    provider = ScriptedProvider(host)
    orch, run_id = _orchestrate(tmp_path, provider)
    orch.drive(run_id, Options(detach=True))
    host.down = True
    notes: list[str] = []
    orch.reporter.note = notes.append  # type: ignore[method-assign]
    calls = {"n": 0}

    def problem(run_id: str, journal: Any) -> str | None:
        calls["n"] += 1
        return None if calls["n"] < 3 else "instance 7 is 'exited' (outbid)"

    provider.health = problem  # type: ignore[method-assign]
    with pytest.raises(MachineLost, match="outbid"):
        orch.drive(run_id, Options(poll_interval=0))
    assert sum("connection problem" in n for n in notes) == 2  # retried while the API saw no fault
    run = orch.journal.get_run(run_id)
    assert run["state"] == "failed" and f"flux-remote fetch {run_id}" in run["error"]
    assert provider.released == [True]  # kept (stopped), not destroyed


def test_vast_health_sees_exited_and_gone_instances(tmp_path: Path, fake_vast: Any,
                                                    sshd: Any) -> None:
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    journal.create_run(run_id="h", name="h", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path), budget_usd=1)
    iid = _labelled_instance(fake_vast, "flux-remote:h")
    row = journal.instance_intent("h", provider="vast", label="flux-remote:h")
    journal.instance_created(row, iid)
    fake_vast.instances[iid]["actual_status"] = "running"
    assert provider.health("h", journal) is None
    fake_vast.interrupt(iid, "exited")
    assert "'exited'" in (provider.health("h", journal) or "")
    del fake_vast.instances[iid]
    assert "no longer exists" in (provider.health("h", journal) or "")
    assert journal.get_instance(row)["state"] == "destroyed"
