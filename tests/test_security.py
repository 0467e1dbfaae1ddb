"""Secrets, host keys and hostile input, proven on a full run (FakeVast + a real sshd).

* canary ``HF_TOKEN``, ``WANDB_API_KEY`` and Vast account key: in no journal byte, log, plan,
  bundle, remote run dir file, process command line (sampled from ``/proc`` during the run), or
  request body sent to Vast; the 0600 secrets file is gone after the run;
* a dataset file named ``$(touch pwned).jpg`` with a hostile caption creates nothing anywhere;
  a symlink out of the dataset is not followed;
* a changed host key aborts with a clear message and rents nothing new;
* the trainer's environment never holds the Vast keys.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from controller.errors import HostKeyError
from controller.run.fetch import verify_sums
from controller.journal import open_journal
from controller.run.orchestrator import Options, Orchestrator
from controller.spec.loader import load_spec
from remote.train import trainer_env
from tests.faults import record
from tests.test_launch_vast_e2e import Recorder, vast_provider, vast_spec

HF = "hf_canaryHFtoken_9f8e7d6c5b4a"
WANDB = "wandbcanary0123456789abcdef0123456789abcd"
HOSTILE = "$(touch pwned).jpg"
OUTSIDE_SECRET = b"outside-the-dataset-canary-5150"


def _cmdlines(stop: threading.Event, seen: list[bytes]) -> None:
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    seen.append((entry / "cmdline").read_bytes())
                except OSError:
                    continue
        stop.wait(0.05)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.ssh
@pytest.mark.slow
def test_canaries_appear_nowhere_and_hostile_names_run_nothing(
        tmp_path: Path, fake_vast: Any, sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    vast_key = fake_vast.api_key
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    spec_path = vast_spec(tmp_path, name="sec")
    data = tmp_path / "data"
    shutil.copy(data / "02_yellow_square.jpg", data / HOSTILE)
    (data / "$(touch pwned).txt").write_text("a 'quoted' \"d3m0\"; $(touch pwned2) `id` ünï\nx",
                                             encoding="utf-8")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(OUTSIDE_SECRET)
    (data / "link.txt").symlink_to(outside)
    (data / "linkdir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes((data / "02_yellow_square.jpg").read_bytes())

    spec = load_spec(spec_path)
    journal = open_journal()
    provider = vast_provider(fake_vast, sshd)
    orch = Orchestrator(journal, provider, reporter=Recorder())
    estimate = provider.estimate(spec)
    out = tmp_path / "bundle"
    run_id = orch.create_run(spec, estimate, out_dir=out)
    stop, seen = threading.Event(), []
    sampler = threading.Thread(target=_cmdlines, args=(stop, seen), daemon=True)
    sampler.start()
    try:
        outcome = orch.drive(run_id, Options(poll_interval=0.1), estimate)
    finally:
        stop.set()
        sampler.join()
    assert outcome.state == "done", outcome.error
    assert verify_sums(out) >= 3

    canaries = [HF.encode(), WANDB.encode(), vast_key.encode()]
    assert seen and not [c for c in seen for k in canaries if k in c]  # no process argument
    root = tmp_path / "instance-root"
    home = Path(os.environ["FLUX_REMOTE_HOME"])
    searched = _files(root) + _files(out) + _files(home)
    assert any(p.name == "journal.sqlite3" for p in searched)
    assert any(p.name == "plan.json" for p in searched)
    assert any(p.name == "agent.log" for p in searched)
    for path in searched:
        blob = path.read_bytes()
        for canary in canaries:
            assert canary not in blob, (path, canary)
    assert not (root / ".secrets" / f"{run_id}.env").exists()  # the 0600 file is gone
    for req in fake_vast.requests:  # the account key travels only in the Authorization header
        assert vast_key not in json.dumps(req.get("json") or ""), req["path"]
    for create in fake_vast.creates:
        assert vast_key not in json.dumps(create)

    for where in (tmp_path, root, root / run_id, root / run_id / "dataset", Path.cwd()):
        assert not (where / "pwned").exists() and not (where / "pwned2").exists(), where
    assert (root / run_id / "dataset" / HOSTILE).is_file()  # shipped under its own name
    shipped = root / run_id / "dataset"
    assert not (shipped / "link.txt").is_file() or (shipped / "link.txt").is_symlink()
    for path in _files(shipped) + _files(out):
        assert OUTSIDE_SECRET not in path.read_bytes(), path
    report = json.loads((out / "quality_report.json").read_text())
    assert "linkdir/x.jpg" not in json.dumps(report.get("images", report))
    record("security:canaries+hostile-names", faults=3, orphans=len(fake_vast.instances))


@pytest.mark.ssh
def test_a_changed_host_key_aborts_and_rents_nothing_new(
        tmp_path: Path, fake_vast: Any, sshd: Any, sshd_changed_hostkey: Any) -> None:
    fake_vast.ssh_endpoint = (sshd.host, sshd.port)
    spec = load_spec(vast_spec(tmp_path, name="pin"))
    provider = vast_provider(fake_vast, sshd)
    orch = Orchestrator(open_journal(), provider, reporter=Recorder())
    estimate = provider.estimate(spec)
    run_id = orch.create_run(spec, estimate, out_dir=tmp_path / "o")
    assert orch.drive(run_id, Options(detach=True), estimate).detached  # key pinned
    sshd_changed_hostkey()
    orch2 = Orchestrator(open_journal(), vast_provider(fake_vast, sshd), reporter=Recorder())
    with pytest.raises(HostKeyError) as info:
        orch2.drive(run_id, Options(poll_interval=0))
    message = str(info.value)
    assert "changed" in message.lower() or "pins" in message
    assert "ssh-keygen -R" in (info.value.hint or "")
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1  # nothing new rented
    assert len(fake_vast.instances) == 1
    orch2.journal.update_run(run_id, state="failed")
    orch2.provider.release(run_id, orch2.journal)
    assert fake_vast.instances == {}
    record("security:host-key-changed", orphans=len(fake_vast.instances))


def test_the_trainer_never_sees_the_vast_keys() -> None:
    env = trainer_env({"CONTAINER_API_KEY": "ck", "VAST_API_KEY": "vk", "PATH": "/bin"},
                      {"HF_TOKEN": "hf", "CONTAINER_API_KEY": "again"})
    assert "CONTAINER_API_KEY" not in env and "VAST_API_KEY" not in env
    assert env["HF_TOKEN"] == "hf" and env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
