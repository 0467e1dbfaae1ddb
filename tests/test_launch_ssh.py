"""``launch`` over the ``ssh`` provider: a real sshd on 127.0.0.1, through the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from controller.run.fetch import verify_sums
from controller.journal import open_journal
from tests.test_launch_local import invoke, write_spec

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


def test_ssh_launch_end_to_end(tmp_path: Path, sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb_canary_0123456789")
    root = tmp_path / "remote-root"
    spec = write_spec(tmp_path, name="s1", provider={
        "type": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user,
        "key_path": str(sshd.key_path), "remote_root": str(root),
        "remote_python": sys.executable, "price_per_hour": 0.5})
    out = tmp_path / "bundle"
    result = invoke("launch", spec, "--yes", "--out", out, "--poll-interval", "0.1", "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output)
    assert outcome["state"] == "done" and outcome["bundle"] == str(out)
    assert 0 < outcome["spend_usd"] < 0.5
    assert [c["name"] for c in outcome["checks"]][:3] == ["python", "ssh", "rsync"]
    assert all(c["ok"] for c in outcome["checks"])  # the machine checks preflight passed
    assert verify_sums(out) >= 3
    run_id = outcome["run_id"]
    assert (root / run_id / "remote" / "__main__.py").exists()
    for path in (root / run_id).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ".jsonl", ".yaml", ".txt"):
            assert b"wandb_canary_0123456789" not in path.read_bytes(), path
    assert not (root / ".secrets" / f"{run_id}.env").exists()  # removed at the end
    journal = open_journal()
    assert journal.get_run(run_id)["state"] == "done"
    assert [r["state"] for r in journal.instances(run_id)] == ["destroyed"]
    known_hosts = Path(journal.path).parent / "known_hosts"
    assert f"[{sshd.host}]:{sshd.port}" in known_hosts.read_text()

    # status / ls / cost / logs read the journal and the fetched copy once the run is over.
    listing = json.loads(invoke("ls", "--json").output)
    assert [r["run_id"] for r in listing["runs"]] == [run_id]
    assert listing["runs"][0]["instance_state"] == "destroyed"
    cost = json.loads(invoke("cost", "--json").output)
    assert cost["total_spend_usd"] == pytest.approx(outcome["spend_usd"], abs=0.05)
    assert "stage train: done" in invoke("logs", run_id).output
    shutil.rmtree(root / run_id)
