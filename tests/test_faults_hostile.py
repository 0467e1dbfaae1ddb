"""A hostile instance: the agent is replaced by one that lies (tests/hostile_agent.py).

Each test launches through the CLI (or the orchestrator, where time must be faked) over the local
provider, LocalHost and the real rsync; only the agent is the stranger's. Each ends with what
issue 16 asks for, observed: no file outside the out dir, nothing uploaded the user did not
produce, no traceback, the machine released (destroyed, or stopped when data must be kept), spend
within 10% of the cap. Each records its outcome for the tally (category ``hostile``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from controller.journal import open_journal
from tests import hostile_agent
from tests.faults import FakeClock, record
from tests.test_launch_local import invoke, write_spec

SECRET = b"VAST_API_KEY=laptop-secret-0123456789\n"


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``hostile(mode)``: the next launch ships the hostile agent playing ``mode``."""
    package = hostile_agent.install(tmp_path / "hostile")
    monkeypatch.setattr("controller.run.ship.remote_package_dir", lambda: package)
    secret = tmp_path / "laptop" / "environ"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    monkeypatch.setenv(hostile_agent.TARGET_ENV, str(secret))
    def choose(mode: str) -> Path:
        monkeypatch.setenv(hostile_agent.MODE_ENV, mode)
        return secret

    yield choose
    # an agent that outlives its run (the local provider does not kill it) is ended here
    for pid_file in Path(os.environ["FLUX_REMOTE_HOME"]).glob("local/*/agent.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()}


def outside(tmp_path: Path, out: Path) -> dict[str, bytes]:
    """Every file of the test's folder but the out dir (the dataset, the spec, the laptop file)."""
    return {name: data for name, data in files_under(tmp_path).items()
            if not (tmp_path / name).is_relative_to(out)}


def observe(tmp_path: Path, out: Path, output: str, secret: Path,
            before: dict[str, bytes]) -> dict[str, Any]:
    """What issue 16 asks every hostile test to show, measured (not assumed): ``before`` is
    :func:`outside` taken before the launch; any file added, changed or gone there counts."""
    journal = open_journal()
    [run] = journal.list_runs()
    instances = journal.instances(run["run_id"])
    links = [p for p in out.rglob("*") if p.is_symlink()] if out.exists() else []
    leaked = [name for name, data in (files_under(out) if out.exists() else {}).items()
              if SECRET.strip() in data]
    return {
        "run": run,
        "links_home": len(links),
        "secret_home": len(leaked),
        "outside_out": len(set(before.items()) ^ set(outside(tmp_path, out).items())),
        "traceback": int("Traceback" in output),
        "escapes_shown": int(any(c in output for c in "\x1b\x07\x9b")),
        "left_running": sum(1 for i in instances if i["state"] not in ("destroyed", "stopped")),
    }


def record_hostile(name: str, seen: dict[str, Any], *, overruns: int = 0, **extra: Any) -> None:
    """One line of the tally: orphans and leaks as observed above, category ``hostile``."""
    leaks = seen["links_home"] + seen["secret_home"] + seen["outside_out"]
    record(name, orphans=seen["left_running"], overruns=overruns, category="hostile",
           measured={"leaks": leaks, "tracebacks": seen["traceback"],
                     "escapes_shown": seen["escapes_shown"], **extra})


def launch(tmp_path: Path, hostile: Any, mode: str, name: str, *flags: str,
           **spec: Any) -> tuple[Any, dict[str, Any], Path]:
    """``flux-remote launch`` with the hostile agent playing ``mode``: (result, observed, out).
    ``-v`` among ``flags`` shows the agent's raw log lines too (the hostile text's way in)."""
    secret = hostile(mode)
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path, name=name, **spec)
    before = outside(tmp_path, out)
    result = invoke("launch", spec_path, "--yes", "--out", out, "--poll-interval", "0.1", *flags)
    return result, observe(tmp_path, out, result.output, secret, before), out


def test_links_in_the_bundle_never_reach_home(tmp_path: Path, hostile: Any) -> None:
    result, seen, out = launch(tmp_path, hostile, "links", "lnk")
    assert result.exit_code == 1, result.output
    assert "README.md: missing, or not a regular file" in result.output
    assert seen["links_home"] == 0 and seen["secret_home"] == 0 and seen["outside_out"] == 0
    assert not (out / "README.md").exists() and not (out / "root").exists()
    assert seen["traceback"] == 0 and seen["left_running"] == 0 and seen["outside_out"] == 0
    down = invoke("down", seen["run"]["run_id"])  # no --force needed
    assert down.exit_code == 0, down.output
    record_hostile("hostile:links-in-bundle", seen)


def test_a_checkpoint_path_outside_the_run_dir_ends_the_run(tmp_path: Path,
                                                            hostile: Any) -> None:
    result, seen, out = launch(tmp_path, hostile, "paths", "pth",
                               publish={"fetch_checkpoints": True})
    assert result.exit_code == 1, result.output
    assert "last_checkpoint" in seen["run"]["error"] and "outside the run dir" in result.output
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert seen["secret_home"] == 0 and seen["outside_out"] == 0 and seen["traceback"] == 0
    assert seen["escapes_shown"] == 0, repr(result.output)  # the error quotes the path, cleaned
    assert seen["left_running"] == 0 and seen["run"]["state"] == "failed"
    record_hostile("hostile:checkpoint-path", seen)


def test_markup_and_escapes_are_shown_as_text_and_publishing_stays_home(
        tmp_path: Path, hostile: Any, fake_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fakehub import FAKE_TOKEN

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    result, seen, out = launch(tmp_path, hostile, "text", "txt", "-v",
                               publish={"hf_repo": "alice/txt-lora"})
    assert result.exit_code == 0, result.output
    assert seen["escapes_shown"] == 0, repr(result.output)
    assert "[bold red]PWNED[/]" in result.output  # markup shown literally
    assert "[link=file:///etc/passwd]click[/link]" in result.output
    assert set(fake_hub.repos) == {"alice/txt-lora"} and fake_hub.repos["alice/txt-lora"].private
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    assert set(fake_hub.repos["alice/txt-lora"].files) <= listed | {"SHA256SUMS"}
    assert seen["traceback"] == 0 and seen["left_running"] == 0 and seen["outside_out"] == 0
    record_hostile("hostile:markup-and-escapes", seen, uploaded_unlisted=0)


@pytest.mark.parametrize("mode", ["numbers", "huge"])
def test_bad_status_ends_in_the_release_path(tmp_path: Path, hostile: Any, mode: str) -> None:
    result, seen, out = launch(tmp_path, hostile, mode, mode)
    assert result.exit_code == 1, result.output
    expected = "'step' is not a number" if mode == "numbers" else "larger than"
    assert expected in seen["run"]["error"], seen["run"]["error"]
    assert seen["run"]["state"] == "failed" and (out / "logs").is_dir()
    assert seen["traceback"] == 0 and seen["left_running"] == 0 and seen["outside_out"] == 0
    events = [e["kind"] for e in open_journal().events(seen["run"]["run_id"])]
    assert "untrusted_input" in events
    record_hostile(f"hostile:status-{mode}", seen)


def test_non_utf8_checksums_keep_the_machine_and_down_works(
        tmp_path: Path, hostile: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_READ_TOKEN", "hf_read_canary")  # flux-dev: a read token is sent
    result, seen, out = launch(tmp_path, hostile, "nonutf8", "utf")
    assert result.exit_code == 1, result.output
    assert "is not UTF-8" in result.output and "flux-remote fetch" in result.output
    assert not (out / "SHA256SUMS").exists()  # nothing unverified moved in
    # the secrets file goes in every ending, a machine kept for a later fetch included
    secrets = Path(os.environ["FLUX_REMOTE_HOME"]) / "local" / ".secrets"
    assert secrets.is_dir() and list(secrets.iterdir()) == []
    assert seen["traceback"] == 0 and seen["left_running"] == 0 and seen["outside_out"] == 0
    down = invoke("down", seen["run"]["run_id"])
    assert down.exit_code == 0 and "Traceback" not in down.output, down.output
    record_hostile("hostile:non-utf8-sums", seen)


class StoppingProvider:
    """The local provider whose ``release(keep_data=True)`` stops the machine the way the Vast
    API's stop does: vast-cli ``stop__instance`` sends ``PUT /instances/{id}/
    {"state": "stopped"}``, which "brings an instance from the running state into the stopped
    state" with its data kept (its epilog): the processes end, the disk stays."""

    def __init__(self, inner: Any, root: Path) -> None:
        self.inner, self.root = inner, root
        self.stops = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def release(self, run_id: str, journal: Any, *, keep_data: bool = False) -> None:
        if keep_data:
            self.stops += 1
            pid = (self.root / run_id / "agent.pid").read_text()
            os.kill(int(pid), signal.SIGKILL)
        self.inner.release(run_id, journal, keep_data=keep_data)


def test_an_agent_that_ignores_stop_is_stopped_from_home_within_the_cap(
        tmp_path: Path, hostile: Any) -> None:
    from controller.providers.local import LocalProvider
    from controller.run.orchestrator import Options, Orchestrator
    from controller.spec.loader import load_spec

    secret = hostile("ignore_stop")
    cap = 3.0  # $6/h: the finish allowance (600 s) is $1, so STOP comes near $2 spent
    spec_path = write_spec(tmp_path, name="cap", budget=cap,
                           provider={"type": "local", "price_per_hour": 6.0})
    spec = load_spec(spec_path)
    before = outside(tmp_path, tmp_path / "out")
    clock = FakeClock()
    clock.now = 1_000_000.0
    journal = open_journal()
    root = Path(os.environ["FLUX_REMOTE_HOME"]) / "local"
    provider = StoppingProvider(LocalProvider(clock=clock), root)
    orch = Orchestrator(journal, provider, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    # each poll moves the fake clock 20 s: STOP after about 60 polls, the grace 15 more
    outcome = orch.drive(run_id, Options(poll_interval=20.0))
    assert outcome.state == "budget" and outcome.error.startswith("budget:"), outcome.error
    assert provider.stops == 1
    kinds = [e["kind"] for e in journal.events(run_id)]
    assert kinds.index("cap_stop") < kinds.index("stop_ignored")
    [stop] = journal.events(run_id, kind="cap_stop")
    grace_usd = 300 * 6.0 / 3600  # budget.stop_grace_s at $6/h
    spent = journal.get_run(run_id)["spend_usd"]
    assert stop["detail"]["spend_usd"] > 1.5  # the agent trained until the cap
    assert spent == pytest.approx(stop["detail"]["spend_usd"] + grace_usd, abs=0.05)
    assert spent <= cap * 1.10, spent
    seen = observe(tmp_path, tmp_path / "out", outcome.error or "", secret, before)
    assert seen["left_running"] == 0 and seen["outside_out"] == 0
    record_hostile("hostile:ignores-stop", seen, overruns=int(spent > cap * 1.10),
                   spend_usd=round(spent, 4), cap_usd=cap)
    # the run stays ended `budget`: resuming it shows that end, `down` needs no --force
    assert orch.drive(run_id, Options(poll_interval=20.0)).state == "budget"
    assert orch.down(run_id).state == "budget"
    assert journal.current_instance(run_id) is None


def test_ctrl_c_during_the_create_request_leaks_no_instance(fake_vast: Any) -> None:
    """Ctrl-C lands after the create reached Vast and before its answer: the journal holds a
    create intent only, and Vast lists the new instance late. Release reads the label back on
    the lost-create schedule and destroys it."""
    from controller.providers.vast import VastProvider
    from controller.run.states import instance_label
    from controller.vast.client import CREATE_READ_BACK_S, VastClient
    from tests.faults import live_instances
    from tests.test_launch_vast_e2e import NO_WAIT

    slept: list[float] = []
    client = VastClient(base_url=fake_vast.url, api_key=fake_vast.api_key,
                        min_intervals=NO_WAIT, sleep=lambda s: None)
    journal = open_journal()
    journal.create_run(run_id="cc", name="cc", provider="vast", state="renting", spec={},
                       out_dir="/nonexistent", budget_usd=1)
    label = instance_label("cc")
    journal.instance_intent("cc", provider="vast", label=label)  # the create was sent ...
    iid = client.create_instance(int(fake_vast.offers[0]["id"]), image="img", disk_gb=10,
                                 label=label)  # ... and made, but its answer never read
    lists = {"n": 0}
    real_list = fake_vast._list

    def late_list(query: dict[str, list[str]]) -> tuple[int, Any]:
        lists["n"] += 1  # Vast lists the new instance only from the third look on
        status, body = real_list(query)
        if lists["n"] < 3:
            body = {**body, "instances": [i for i in body["instances"] if i["id"] != iid]}
        return status, body

    fake_vast._list = late_list
    VastProvider(client, sleep=slept.append).release("cc", journal)
    assert live_instances(fake_vast) == [] and iid not in fake_vast.instances
    assert slept == list(CREATE_READ_BACK_S[:2])
    assert journal.pending_intents() == [] and journal.current_instance("cc") is None
    record("hostile:ctrl-c-during-create", orphans=len(fake_vast.instances), category="hostile",
           measured={"leaks": 0, "tracebacks": 0, "escapes_shown": 0})


def test_offers_abandoned_during_readiness_count_toward_the_cap(tmp_path: Path) -> None:
    """An instance destroyed while it loaded billed from create to destroy: the meter, and so
    the cap, counts it with the machine that runs."""
    import time

    from controller.run.follow import Follower, RunPaths
    from controller.run.relaunch import earlier_machines_usd
    from tests.test_resume_gc import ScriptedHost

    journal = open_journal()
    journal.create_run(run_id="ab", name="ab", provider="vast", state="running", spec={},
                       out_dir=str(tmp_path / "out"), budget_usd=1.5)
    gone = journal.instance_intent("ab", provider="vast", dph_total=6.0)
    journal.instance_created(gone, 1, billing_started_at=time.time() - 600)  # loaded 10 min
    journal.instance_destroyed(gone)
    current = journal.instance_intent("ab", provider="vast", dph_total=6.0)
    journal.instance_created(current, 2, billing_started_at=time.time())
    extra = earlier_machines_usd(journal, "ab", time.time(), current_row=current)
    assert extra == pytest.approx(1.0, abs=0.05)
    now = time.time()

    def follower(abandoned: float) -> Any:
        return Follower(ScriptedHost(), RunPaths("/r/ab"), journal=journal, run_id="ab",
                        price_per_hour=6.0, billing_started_at=now, budget_usd=1.5,
                        prior_usd=abandoned, clock=lambda: now, sleep=lambda s: None)

    assert not follower(0.0).poll().stop_requested  # its own $0 + the finish's $1 < $1.50
    snap = follower(extra).poll()
    assert snap.stop_requested and snap.spend_usd == pytest.approx(extra)
    record("hostile:abandoned-offers-metered", overruns=0, category="hostile",
           measured={"leaks": 0, "tracebacks": 0, "escapes_shown": 0,
                     "abandoned_usd": round(extra, 4)})


class SeatedStoppingProvider(StoppingProvider):
    """:class:`StoppingProvider` whose machine is seat 0 of a shared 2-GPU instance (the row's
    detail, as ``Journal.instance_intent(seats=2)`` writes it); ``stop_machine`` stops the whole
    instance as the Vast API's stop does (the agent's processes end)."""

    def __init__(self, inner: Any, root: Path) -> None:
        super().__init__(inner, root)
        self.machine_stops = 0

    def acquire(self, run_id: str, spec: Any, estimate: Any, journal: Any, notify: Any) -> Any:
        machine = self.inner.acquire(run_id, spec, estimate, journal, notify)
        journal.update_instance(machine.instance_row, detail='{"seat": 0, "seats": 2}')
        return machine

    def stop_machine(self, run_id: str, journal: Any) -> None:
        self.machine_stops += 1
        pid = (self.root / run_id / "agent.pid").read_text()
        os.kill(int(pid), signal.SIGKILL)
        journal.instance_stopped(int(journal.current_instance(run_id)["id"]))


def test_a_seat_whose_agent_ignores_stop_has_its_whole_machine_stopped(
        tmp_path: Path, hostile: Any) -> None:
    from controller.providers.local import LocalProvider
    from controller.run.orchestrator import Options, Orchestrator
    from controller.spec.loader import load_spec

    hostile("ignore_stop")
    spec = load_spec(write_spec(tmp_path, name="seat", budget=3.0,
                                provider={"type": "local", "price_per_hour": 6.0}))
    clock = FakeClock()
    clock.now = 1_000_000.0
    journal = open_journal()
    root = Path(os.environ["FLUX_REMOTE_HOME"]) / "local"
    provider = SeatedStoppingProvider(LocalProvider(clock=clock), root)
    orch = Orchestrator(journal, provider, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    run_id = orch.create_run(spec, provider.estimate(spec), out_dir=tmp_path / "out")
    outcome = orch.drive(run_id, Options(poll_interval=20.0))
    assert outcome.state == "budget" and outcome.error.startswith("budget:"), outcome.error
    # not a seat's release (which would leave the machine to the others): the whole instance
    assert provider.machine_stops == 1 and provider.stops == 0
    kinds = [e["kind"] for e in journal.events(run_id)]
    assert kinds.index("cap_stop") < kinds.index("stop_ignored")
    assert journal.current_instance(run_id)["state"] == "stopped"  # kept for its fetch
