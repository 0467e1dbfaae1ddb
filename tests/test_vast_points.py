"""Issue 14, point by point, without an sshd: what the service does and how the controller and
the agent take it (the runs themselves are in tests/test_vast_service.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.errors import ProviderError, TransportError
from controller.hosts.base import CommandResult
from controller.planning.planner import ENDS_TOO_SOON, plan_offers, search_query
from controller.spec.loader import load_spec
from controller.vast.client import VastClient, key_paths
from controller.vast.onstart import (find_python, instance_env_file, onstart_marker,
                                     onstart_script, wait_for_onstart)
from controller.vast.readiness import Deadlines, wait_until_running
from remote.watchdog import instance_env
from tests.fakevast import FakeVast, reference_offers
from tests.test_readiness import Clock
from tests.test_launch_local import write_spec

NO_WAIT = {k: 0.0 for k in ("show", "create", "destroy", "list", "search", "other")}


def _client(fake: FakeVast) -> VastClient:
    return VastClient(fake.api_key, fake.url, timeout=5, min_intervals=NO_WAIT,
                      sleep=lambda s: None)


class ScriptedHost:
    """A Host whose ``run`` answers from a function of the command (no machine needed)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.commands: list[str] = []

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float | None = None,
            check: bool = True) -> CommandResult:
        self.commands.append(command)
        return self.answer(command)


# -- point 3: exited on stop, scheduling on start ----------------------------------------------

def test_stop_reads_back_exited_and_start_goes_through_scheduling_and_loading() -> None:
    with FakeVast(loading_polls=1) as fake:
        client = _client(fake)
        iid = client.create_instance(35365119, image="img", disk_gb=40, label="x")
        wait_until_running(client, iid, deadlines=Deadlines(poll_s=0), sleep=lambda s: None)
        client.stop_instance(iid)
        stopped = client.show_instance(iid)
        assert (stopped["actual_status"], stopped["intended_status"]) == ("exited", "stopped")
        client.start_instance(iid)
        seen = [client.show_instance(iid)["actual_status"] for _ in range(3)]
        assert seen == ["scheduling", "loading", "running"]


# -- point 8: null right after a create --------------------------------------------------------

def test_an_instance_not_listed_yet_is_waited_for_not_given_up() -> None:
    with FakeVast(unlisted_polls=3, loading_polls=0) as fake:
        client = _client(fake)
        iid = client.create_instance(35365119, image="img", disk_gb=40, label="x")
        assert client.show_instance(iid) is None and client.list_instances() == []
        from controller.vast.errors import InstanceNotReadyError
        with pytest.raises(InstanceNotReadyError, match="disappeared"):
            wait_until_running(client, iid, deadlines=Deadlines(poll_s=0), sleep=lambda s: None)
        clock = Clock()
        inst = wait_until_running(client, iid, deadlines=Deadlines(poll_s=1.0), clock=clock,
                                  sleep=clock.sleep, unlisted_grace_s=30.0)
        assert inst["actual_status"] == "running"
        assert len(fake.calls("PUT", "/api/v0/asks/")) == 1


# -- point 5: billing ---------------------------------------------------------------------------

def test_the_fake_bills_gpu_while_running_storage_always_and_bandwidth_per_gb() -> None:
    clock = Clock()
    with FakeVast(loading_polls=0, image_gb=10.0, clock=clock) as fake:
        client = _client(fake)
        offer = next(o for o in fake.offers if o["id"] == 35365119)
        iid = client.create_instance(35365119, image="img", disk_gb=72, label="x")
        storage_dph = offer["storage_cost"] * 72 / 720
        assert client.show_instance(iid)["dph_total"] == pytest.approx(
            offer["dph_base"] + storage_dph)  # re-priced with its own disk
        clock.now = 3600.0
        client.stop_instance(iid)
        clock.now = 7200.0
        fake.receive(iid, 2.0)
        bill = fake.bill(iid)
        assert bill["gpu"] == pytest.approx(offer["dph_base"])
        assert bill["storage"] == pytest.approx(2 * storage_dph)  # stopped: storage still bills
        assert bill["bandwidth"] == pytest.approx(12.0 * offer["inet_down_cost"])


# -- point 6: offers end ------------------------------------------------------------------------

def test_offers_ending_before_the_estimate_plus_margin_are_not_chosen(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, name="ends", budget=50.0, provider={"type": "vast"}))
    offers = reference_offers()
    assert plan_offers(spec, offers).chosen is not None
    for offer in offers:
        offer["duration"] = 600.0  # ten minutes left on the host's contract
    result = plan_offers(spec, offers)
    assert result.chosen is None and result.excluded.get(ENDS_TOO_SOON)
    for offer in offers:
        del offer["duration"]
        offer["end_date"] = 1_000_600.0
    assert plan_offers(spec, offers, now=1_000_000.0).chosen is None
    assert plan_offers(spec, offers, now=0.0).chosen is not None


def test_search_refuses_an_unknown_filter_field_and_our_query_passes(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, name="q", budget=5.0, provider={"type": "vast"}))
    with FakeVast() as fake:
        client = _client(fake)
        assert client.search_offers(search_query(spec)) is not None
        with pytest.raises(ProviderError):
            client.search_offers({"gpu_nmae": {"eq": "RTX 4090"}})


# -- point 7: the key file ----------------------------------------------------------------------

def test_the_key_file_follows_xdg_config_home_then_the_legacy_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.vast.client import find_api_key

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    xdg = tmp_path / "xdg"
    assert key_paths({"XDG_CONFIG_HOME": str(xdg)})[0] == xdg / "vastai" / "vast_api_key"
    assert key_paths({"XDG_CONFIG_HOME": "relative"})[0] == \
        tmp_path / ".config" / "vastai" / "vast_api_key"
    (tmp_path / ".vast_api_key").write_text("legacy-key\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert find_api_key() == "legacy-key"
    (xdg / "vastai").mkdir(parents=True)
    (xdg / "vastai" / "vast_api_key").write_text("xdg-key\n")
    assert find_api_key() == "xdg-key"


# -- point 9: credit and balance ----------------------------------------------------------------

def test_both_money_fields_are_read_and_neither_is_guessed() -> None:
    with FakeVast() as fake:
        fake.credit, fake.balance = 12.5, -3.0
        assert _client(fake).account_money() == {"credit": 12.5, "balance": -3.0}


# -- points 1 and 4: onstart hands over the variables and writes the marker last -----------------

def test_onstart_writes_the_variables_0600_never_prints_them_and_marks_the_end(
        tmp_path: Path) -> None:
    import subprocess

    root = str(tmp_path / "root")
    script = onstart_script(root, "http://127.0.0.1:1")
    assert "container-key" not in script
    env = {"PATH": "/opt/conda/bin:/usr/bin:/bin", "CONTAINER_ID": "7",
           "CONTAINER_API_KEY": "container-key-7"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, check=True)
    assert b"container-key-7" not in done.stdout + done.stderr
    env_file = Path(instance_env_file(root))
    assert env_file.stat().st_mode & 0o777 == 0o600 and Path(onstart_marker(root)).exists()
    plan = {"instance": {"env_file": str(env_file)}}
    merged = instance_env(plan, {"PATH": "/bin"}, pid1_environ=tmp_path / "none")
    assert merged["CONTAINER_ID"] == "7" and merged["CONTAINER_API_KEY"] == "container-key-7"
    assert merged["VAST_URL"] == "http://127.0.0.1:1"
    assert "IMAGE_PATH=/opt/conda/bin:/usr/bin:/bin" in env_file.read_text()


def test_without_the_file_the_variables_come_from_pid_1(tmp_path: Path) -> None:
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/bin\0CONTAINER_ID=9\0CONTAINER_API_KEY=k9\0")
    merged = instance_env({"instance": {}}, {}, pid1_environ=environ)
    assert (merged["CONTAINER_ID"], merged["CONTAINER_API_KEY"]) == ("9", "k9")
    assert "CONTAINER_ID" not in instance_env({}, {}, pid1_environ=tmp_path / "none")


def test_the_checks_stage_fails_on_vast_when_self_stop_is_impossible(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from remote.checks import ChecksReport
    from remote.stages.prepare import checks
    from remote.status import StageFailed

    report = ChecksReport(checks=[], gpu={}, cache_root="/tmp", mount_choice={})
    monkeypatch.setattr("remote.checks.run_checks", lambda *a, **k: report)

    class Run:
        plan = {"provider": "vast", "instance": {"env_file": "/nowhere/vast.env"}}
        spec: dict[str, Any] = {}
        probes = None
        watchdog = type("Dog", (), {"can_stop_instance": False})()
        log = type("Log", (), {"agent": staticmethod(lambda text: None)})()
        recorder = type("Rec", (), {"event": staticmethod(lambda *a, **k: None)})()

    with pytest.raises(StageFailed, match="self-stop is impossible"):
        checks(Run())  # type: ignore[arg-type]


def test_the_marker_is_waited_for_with_a_deadline_on_the_injected_clock() -> None:
    clock = Clock()
    looks = iter([False, False, True])

    def answer(command: str) -> CommandResult:
        if next(looks):
            return CommandResult(command, "", "", 0)
        raise TransportError("sshd restarting")
    host = ScriptedHost(answer)
    waited = wait_for_onstart(host, "/w", deadline_s=60, poll_s=5, clock=clock,
                              sleep=clock.sleep)
    assert waited == 10 and all("onstart.done" in c for c in host.commands)
    never = ScriptedHost(lambda c: CommandResult(c, "", "", 1))
    with pytest.raises(ProviderError, match="did not finish within 60 s"):
        wait_for_onstart(never, "/w", deadline_s=60, poll_s=5, clock=clock, sleep=clock.sleep)


# -- point 2: the interpreter -------------------------------------------------------------------

def test_find_python_names_every_interpreter_tried_when_none_has_torch() -> None:
    host = ScriptedHost(lambda c: CommandResult(c, "NO /usr/bin/python3\nNO /usr/bin/python3\n",
                                                "", 1))
    with pytest.raises(ProviderError, match=r"tried: /usr/bin/python3\n"):
        find_python(host, "/w")
    found = ScriptedHost(lambda c: CommandResult(c, "NO /usr/bin/python3\nOK /opt/conda/bin/"
                                                    "python3\n", "", 0))
    assert find_python(found, "/w") == "/opt/conda/bin/python3"
    assert "/opt/conda/bin/python3" in found.commands[0]  # a known location is tried


def test_find_python_really_probes_on_this_machine(tmp_path: Path) -> None:
    """The probe script itself, run by bash here: the image PATH from the env file first."""
    import subprocess
    import sys

    conda = tmp_path / "conda" / "bin"
    conda.mkdir(parents=True)
    (conda / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (conda / "python3").chmod(0o755)
    root = str(tmp_path / "root")
    Path(instance_env_file(root)).parent.mkdir(parents=True)
    Path(instance_env_file(root)).write_text(f"IMAGE_PATH={conda}:/usr/bin\n")

    def run(command: str) -> CommandResult:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin"})
        return CommandResult(command, done.stdout, done.stderr, done.returncode)
    assert find_python(ScriptedHost(run), root) == f"{conda}/python3"
    assert json.dumps(find_python(ScriptedHost(run), root, sys.executable)) == \
        json.dumps(sys.executable)


def test_plan_shows_both_credit_and_balance_and_refuses_nothing_on_them(
        tmp_path: Path, fake_vast: FakeVast) -> None:
    from typer.testing import CliRunner

    from controller.cli.main import app

    fake_vast.credit, fake_vast.balance = 0.01, 0.0  # far below the estimate: still no refusal
    spec = write_spec(tmp_path, name="acct", budget=5.0, provider={"type": "vast"})
    shown = CliRunner().invoke(app, ["plan", str(spec)])
    assert shown.exit_code == 0, shown.output
    assert "credit $0.01, balance $0.00" in " ".join(shown.output.split())
    as_json = CliRunner().invoke(app, ["plan", str(spec), "--json"])
    assert json.loads(as_json.output)["account"] == {"credit": 0.01, "balance": 0.0}


def test_a_reattach_reuses_the_interpreter_found_when_the_instance_was_rented(
        tmp_path: Path) -> None:
    """The probe imports torch (seconds); a reattach takes the journaled choice while it is still
    an executable file on that instance, and probes again otherwise."""
    import sys

    from controller.hosts.local import LocalHost
    from controller.journal import Journal
    from controller.providers.vast import VastProvider

    journal = Journal(tmp_path / "j.sqlite3")
    journal.create_run(run_id="r", name="r", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path), budget_usd=1.0)
    journal.add_event("r", "remote_python", {"instance_id": "7", "python": sys.executable})
    journal.add_event("r", "remote_python", {"instance_id": "8", "python": "/nowhere/python3"})
    host = LocalHost()
    assert VastProvider._known_python(host, journal, "7") == sys.executable
    assert VastProvider._known_python(host, journal, "8") is None  # gone: probe again
    assert VastProvider._known_python(host, journal, "9") is None  # never seen
