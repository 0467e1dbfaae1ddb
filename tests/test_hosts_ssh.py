"""SshHost against a real sshd on 127.0.0.1: commands, files, detached runs, drops, pins, rsync."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from controller.errors import HostKeyError, TransportError
from controller.hosts.base import CommandFailed, Host
from controller.hosts.ssh import SshHost, Unreachable, host_key_name

pytestmark = pytest.mark.ssh

HOSTILE = [
    "$(touch pwned).jpg",
    'sp ace\'s "q".txt',
    "semi;colon`id`.txt",
    "new\nline.txt",
    "ünï😀.txt",
]


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    return tmp_path / "state dir" / "known_hosts"  # a space, like macOS "Application Support"


@pytest.fixture
def host(sshd, known_hosts: Path):
    with SshHost(sshd.target(known_hosts), sleep=lambda s: None) as h:
        yield h


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_is_a_host(host: SshHost) -> None:
    assert isinstance(host, Host)


def test_run_returns_output_and_exit_code(host: SshHost) -> None:
    result = host.run("echo out; echo err >&2; exit 3", check=False)
    assert (result.stdout, result.stderr, result.exited, result.ok) == ("out\n", "err\n", 3, False)
    with pytest.raises(CommandFailed) as info:
        host.run("echo one >&2; echo two >&2; exit 4")
    assert info.value.result.exited == 4
    assert "exited 4" in str(info.value) and "two" in str(info.value)
    assert host.run("true").ok


def test_run_feeds_stdin_and_handles_large_output(host: SshHost) -> None:
    data = os.urandom(3_000_000)
    assert host.run("wc -c", stdin=data).stdout.strip() == str(len(data))
    assert len(host.run("head -c 2000000 /dev/zero | tr '\\0' x").stdout) == 2_000_000


def test_run_timeout_raises_and_next_call_works(host: SshHost) -> None:
    from controller.hosts.ssh import CommandTimeout

    with pytest.raises(CommandTimeout, match="timed out"):
        host.run("sleep 5", timeout=0.3)
    assert host.run("echo back").stdout == "back\n"


def test_read_bytes_offsets_limits_and_missing_file(host: SshHost, tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    path.write_bytes(b"0123456789")
    assert host.read_bytes(str(path)) == b"0123456789"
    assert host.read_bytes(str(path), 4) == b"456789"
    assert host.read_bytes(str(path), 4, limit=3) == b"456"
    assert host.read_bytes(str(path), 10) == b""
    assert host.read_bytes(str(path), 99) == b""
    assert host.read_bytes(str(tmp_path / "nope.log")) is None
    with path.open("ab") as fh:
        fh.write(b"abc")
    assert host.read_bytes(str(path), 10) == b"abc"  # a log tail: only the new bytes


def test_write_bytes_secret_is_0600_and_never_on_a_command_line(
    host: SshHost, tmp_path: Path
) -> None:
    secret = "hf_CANARY" + "x" * 40
    payload = (f"HF_TOKEN={secret}\n" * 50_000).encode()
    seen: list[str] = []
    done = threading.Event()
    scans = 0

    def scan() -> None:
        nonlocal scans
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        cmdline = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if secret.encode() in cmdline:
                        seen.append(cmdline.decode(errors="replace"))
            scans += 1

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        target = tmp_path / "secrets" / "env"
        host.write_bytes(str(target), payload, mode=0o600)
    finally:
        done.set()
        scanner.join()
    assert scans > 0 and seen == []
    assert target.read_bytes() == payload
    assert target.stat().st_mode & 0o777 == 0o600
    assert not list(target.parent.glob(".*tmp"))
    host.write_bytes(str(target), b"replaced", mode=0o644)
    assert target.read_bytes() == b"replaced" and target.stat().st_mode & 0o777 == 0o644


def test_hostile_names_are_never_executed(host: SshHost, tmp_path: Path) -> None:
    home = Path(host.run("pwd").stdout.strip())
    folder = tmp_path / "run $(touch pwned) 'x'"
    for name in HOSTILE:
        path = str(folder / name)
        host.write_bytes(path, name.encode())
        assert host.read_bytes(path) == name.encode()
    assert sorted(p.name for p in folder.iterdir()) == sorted(HOSTILE)
    listing = host.run(f"ls -1 -- {shlex.quote(str(folder))} | wc -l").stdout.strip()
    assert int(listing) >= len(HOSTILE)
    assert not (home / "pwned").exists() and not (folder / "pwned").exists()
    assert not list(tmp_path.rglob("pwned"))


def _argv_recorder(out: Path) -> list[str]:
    code = (
        "import json,os,sys; seen = [sys.argv[2:], os.getcwd(), os.environ.get('GREETING')]; "
        "open(sys.argv[1],'w').write(json.dumps(seen))"
    )
    return [sys.executable, "-c", code, str(out)]


def test_start_detached_quotes_everything_and_records_pid_and_rc(
    host: SshHost, tmp_path: Path
) -> None:
    import json

    cwd = tmp_path / "cwd $(touch pwned)"
    cwd.mkdir()
    out = tmp_path / "argv.json"
    log, pid_file, rc_file = tmp_path / "run" / "agent.log", tmp_path / "pid", tmp_path / "rc"
    rc_file.write_text("stale\n")
    pid = host.start_detached(
        _argv_recorder(out) + HOSTILE,
        cwd=str(cwd),
        log_path=str(log),
        env={"GREETING": "hi $(touch pwned) 'there'"},
        pid_path=str(pid_file),
        rc_path=str(rc_file),
    )
    assert pid > 1 and int(pid_file.read_text()) == pid
    assert _wait_for(lambda: rc_file.exists() and rc_file.read_text().strip() == "0")
    assert json.loads(out.read_text()) == [HOSTILE, str(cwd), "hi $(touch pwned) 'there'"]
    assert not list(tmp_path.rglob("pwned"))
    with pytest.raises(ValueError):
        host.start_detached(
            ["true"],
            cwd="/",
            log_path=str(log),
            env={"A B": "x"},
            pid_path=str(pid_file),
            rc_path=str(rc_file),
        )


def test_detached_process_survives_a_dropped_connection(
    sshd, host: SshHost, tmp_path: Path
) -> None:
    log, pid_file, rc_file = tmp_path / "agent.log", tmp_path / "pid", tmp_path / "rc"
    go = tmp_path / "go"
    # The process waits for the test's word, not for a fixed time: on a loaded machine the
    # reconnect can take longer than any sleep, and a process that already ended proves nothing.
    script = (
        "import os,sys,time; print('started', flush=True); t=time.monotonic()\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() - t < 120: time.sleep(0.05)\n"
        "print('finished', flush=True); sys.exit(7)"
    )
    pid = host.start_detached(
        [sys.executable, "-c", script], cwd=str(tmp_path), log_path=str(log),
        pid_path=str(pid_file), rc_path=str(rc_file),
    )  # fmt: skip
    assert host.is_alive(pid)
    connects = host.connects
    assert sshd.kill_connections() >= 1
    assert host.is_alive(pid)  # reconnected on the way
    assert host.connects == connects + 1
    go.touch()
    assert _wait_for(lambda: rc_file.exists())
    assert rc_file.read_text().strip() == "7"
    assert not host.is_alive(pid)
    assert log.read_text().splitlines() == ["started", "finished"]


def test_reconnects_after_connections_are_killed(sshd, host: SshHost) -> None:
    host.run("true")
    for _ in range(3):
        sshd.kill_connections()
        assert host.run("echo again").stdout == "again\n"
    assert host.connects == 4


def test_command_in_flight_when_the_connection_drops_raises(sshd, host: SshHost) -> None:
    from controller.hosts.ssh import ConnectionLost

    host.run("true")
    threading.Timer(0.3, sshd.kill_connections).start()
    with pytest.raises(ConnectionLost):
        host.run("sleep 3")
    assert host.run("echo ok").stdout == "ok\n"


def test_waits_for_sshd_to_come_back_with_backoff(sshd, known_hosts: Path) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            sshd.start()

    with SshHost(sshd.target(known_hosts), sleep=sleep) as h:
        h.run("true")
        sshd.stop()
        assert h.run("echo up").stdout == "up\n"
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_the_reconnect_window(sshd, known_hosts: Path) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    sshd.stop()
    h = SshHost(sshd.target(known_hosts), reconnect_window_s=30, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(Unreachable, match="cannot reach"):
        h.run("true")
    assert 30 <= now[0] < 31


def test_host_key_is_pinned_on_first_use_and_a_change_is_refused(
    sshd, sshd_changed_hostkey, known_hosts: Path, tmp_path: Path
) -> None:
    with SshHost(sshd.target(known_hosts)) as h:
        h.run("true")
    pinned = known_hosts.read_text()
    name = host_key_name(sshd.host, sshd.port)
    assert pinned.startswith(f"{name} ssh-ed25519 ")
    assert pinned.split()[2] == Path(f"{sshd.host_key_path}.pub").read_text().split()[1]
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    with SshHost(sshd.target(known_hosts)) as h:  # same key: accepted, nothing rewritten
        h.run("true")
    assert known_hosts.read_text() == pinned

    sshd_changed_hostkey()
    with pytest.raises(HostKeyError) as info:
        SshHost(sshd.target(known_hosts), sleep=lambda s: None).run("touch pwned-by-mitm")
    message = str(info.value)
    assert name in message and str(known_hosts) in message and "ssh-keygen -R" in message
    assert known_hosts.read_text() == pinned  # the pin is not replaced
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    with pytest.raises(HostKeyError):  # rsync is never started towards the changed host
        SshHost(sshd.target(known_hosts)).upload(src, str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()

    some_key = " ".join(Path(f"{sshd.key_path}.pub").read_text().split()[:2])
    other = f"[10.0.0.9]:2222 {some_key}\n"  # another host's pin: kept as it is
    known_hosts.write_text(other + pinned)
    # a newly rented instance on this address: its first key replaces the pin, once
    with SshHost(sshd.target(known_hosts), repin_first=True) as h:
        assert h.run("echo repinned").ok
    repinned = known_hosts.read_text()
    assert repinned.startswith(other) and repinned.count(name) == 1 and pinned not in repinned
    with SshHost(sshd.target(known_hosts), repin_first=True) as h:  # the same key: no rewrite
        assert h.run("true").ok
    assert known_hosts.read_text() == repinned


def test_a_key_the_server_does_not_know_is_refused_without_retrying(
    sshd, known_hosts: Path, tmp_path: Path
) -> None:
    from tests.fixtures_sshd import _keygen

    stranger = tmp_path / "stranger"
    _keygen(stranger)
    target = sshd.target(known_hosts)
    sleeps: list[float] = []
    bad = SshHost(
        type(target)(target.host, target.port, target.user, stranger, known_hosts),
        sleep=sleeps.append,
    )
    with pytest.raises(TransportError, match="refused our key"):
        bad.run("true")
    assert sleeps == []


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".rsync-partial" not in p.parts
    }


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, name in enumerate(HOSTILE):
        (root / name).write_bytes(os.urandom(20_000 + i))
    (root / "sub dir").mkdir()
    (root / "sub dir" / "cap $(id).txt").write_text("a caption")
    return root


def test_upload_and_download_round_trip_hostile_names_and_skip_unchanged(
    host: SshHost, tmp_path: Path
) -> None:
    src = _dataset(tmp_path / "data set")
    remote = tmp_path / "remote" / "run $(touch pwned)"
    first = host.upload(src, str(remote))
    assert _tree(remote) == _tree(src)
    assert first.files_sent == len(HOSTILE) + 1 and first.bytes_sent > first.total_size * 0.9
    again = host.upload(src, str(remote))
    assert again.files_sent == 0 and again.bytes_sent < first.total_size * 0.01

    back = tmp_path / "back"
    got = host.download(str(remote), back)
    assert _tree(back) == _tree(src)
    assert got.bytes_sent > got.total_size * 0.9
    assert host.download(str(remote), back).bytes_sent < got.total_size * 0.01

    single = tmp_path / "one" / "file.bin"
    host.download(str(remote / HOSTILE[0]), single)
    assert single.read_bytes() == (src / HOSTILE[0]).read_bytes()
    assert not list(tmp_path.rglob("pwned")) and not (Path.home() / "pwned").exists()
    with pytest.raises(TransportError, match="does not exist"):
        host.download(str(tmp_path / "missing"), back)


def test_fetch_extras_is_one_rsync_and_missing_files_are_skipped(
    host: SshHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller.run.fetch import fetch_extras
    from controller.run.follow import RunPaths

    run = tmp_path / "run $(touch pwned)"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "w.bin").write_bytes(b"w")
    for name in ("agent.log", "status.json", "events.jsonl", "plan.json", *HOSTILE):
        (run / name).write_text(name)  # no agent.out: the agent never crashed before logging
    calls = tmp_path / "rsync calls"
    wrapper = tmp_path / "bin" / "rsync"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" | head -n 1 >> {shlex.quote(str(calls))}\n'
                       f'exec {shlex.quote(shutil.which("rsync") or "rsync")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")

    def rsyncs() -> int:  # this side's; the other side's "rsync --server" is not counted
        lines = calls.read_text().splitlines() if calls.exists() else []
        return len([line for line in lines if "--server" not in line])

    got = fetch_extras(host, RunPaths(str(run)), tmp_path / "out")
    logs = ["agent.log", "events.jsonl", "status.json"]
    assert sorted(Path(p).name for p in got) == logs and rsyncs() == 1
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == logs
    got = fetch_extras(host, RunPaths(str(run)), tmp_path / "out", checkpoint=str(run / "ckpt"))
    assert (tmp_path / "out" / "checkpoints" / "ckpt" / "w.bin").read_bytes() == b"w"
    assert len(got) == 4 and rsyncs() == 3
    gone = tmp_path / "gone"
    assert fetch_extras(host, RunPaths(str(gone)), tmp_path / "o2", checkpoint=str(gone)) == []
    host.download(str(run), tmp_path / "picked", includes=HOSTILE)  # names travel in the protocol
    assert sorted(p.name for p in (tmp_path / "picked").iterdir()) == sorted(HOSTILE)
    assert not list(tmp_path.rglob("pwned")) and not (Path.home() / "pwned").exists()


def test_upload_excludes_and_delete_stays_inside_the_destination(
    host: SshHost, tmp_path: Path
) -> None:
    src = _dataset(tmp_path / "src")
    (src / "skip.tmp").write_text("no")
    remote = tmp_path / "runs" / "r1"
    sibling = tmp_path / "runs" / "keep.txt"
    sibling.parent.mkdir(parents=True)
    sibling.write_text("keep")
    host.upload(src, str(remote), excludes=["*.tmp"])
    assert not (remote / "skip.tmp").exists()
    (remote / "stale.txt").write_text("old")
    host.upload(src, str(remote), delete=True, excludes=["*.tmp"])
    assert not (remote / "stale.txt").exists() and sibling.read_text() == "keep"
    for bad in ["/", "~", "~/x", "", "relative/dir", "/workspace", "/tmp/../", "/root"]:
        with pytest.raises(ValueError, match="refusing rsync --delete"):
            host.upload(src, bad, delete=True)


def test_interrupted_upload_resumes_without_resending_everything(
    sshd, known_hosts: Path, tmp_path: Path
) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(6_000_000))
    remote = tmp_path / "remote"

    def received() -> int:  # rsync writes into a hidden temp file until the file is complete
        return (
            sum(p.stat().st_size for p in remote.glob(".weights.bin.*")) if remote.exists() else 0
        )

    sleeps: list[float] = []
    slow = SshHost(sshd.target(known_hosts), sleep=sleeps.append, rsync_args=["--bwlimit=3000"])

    def drop_midway() -> None:
        if _wait_for(lambda: received() > 1_500_000, timeout=15):
            sshd.kill_connections()

    killer = threading.Thread(target=drop_midway)
    killer.start()
    stats = slow.upload(src, str(remote))
    killer.join()
    assert stats.attempts == 2 and sleeps == [1.0]
    assert stats.bytes_sent < 0.85 * stats.total_size  # the resumed attempt skipped what arrived
    assert _tree(remote) == _tree(src)
