"""LocalHost: the same contract as SshHost, on this machine."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from controller.errors import TransportError
from controller.hosts.base import CommandFailed, Host
from controller.hosts.local import LocalHost, process_alive

HOSTILE = [
    "$(touch pwned).jpg",
    'sp ace\'s "q".txt',
    "semi;colon`id`.txt",
    "new\nline.txt",
    "ünï😀.txt",
]


@pytest.fixture
def host() -> LocalHost:
    return LocalHost(sleep=lambda s: None)


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_is_a_host(host: LocalHost) -> None:
    assert isinstance(host, Host)


def test_run_output_exit_stdin_and_timeout(host: LocalHost) -> None:
    result = host.run("echo out; echo err >&2; exit 3", check=False)
    assert (result.stdout, result.stderr, result.exited, result.ok) == ("out\n", "err\n", 3, False)
    assert host.run("wc -c", stdin=b"12345").stdout.strip() == "5"
    with pytest.raises(CommandFailed, match="exited 2"):
        host.run("exit 2")
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        host.run("sleep 5; echo never", timeout=0.2)
    assert time.monotonic() - started < 4.5  # killed, not waited for (it sleeps 5 s)


def test_read_bytes_offsets_and_missing(host: LocalHost, tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    path.write_bytes(b"0123456789")
    assert host.read_bytes(str(path), 4) == b"456789"
    assert host.read_bytes(str(path), 4, limit=3) == b"456"
    assert host.read_bytes(str(path), 50) == b""
    assert host.read_bytes(str(tmp_path / "missing")) is None
    with pytest.raises(ValueError):
        host.read_bytes(str(path), -1)


def test_write_bytes_mode_and_atomic_replace(host: LocalHost, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "secrets.env"
    host.write_bytes(str(target), b"HF_TOKEN=canary\n", mode=0o600)
    assert target.read_bytes() == b"HF_TOKEN=canary\n"
    assert target.stat().st_mode & 0o777 == 0o600
    host.write_bytes(str(target), b"new", mode=0o644)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["secrets.env"]


def test_hostile_names_round_trip(host: LocalHost, tmp_path: Path) -> None:
    folder = tmp_path / "run $(touch pwned)"
    for name in HOSTILE:
        host.write_bytes(str(folder / name), name.encode())
        assert host.read_bytes(str(folder / name)) == name.encode()
    assert sorted(p.name for p in folder.iterdir()) == sorted(HOSTILE)
    assert not list(tmp_path.rglob("pwned"))


def test_start_detached_records_pid_rc_and_survives_its_starter(
    host: LocalHost, tmp_path: Path
) -> None:
    cwd = tmp_path / "cwd $(touch pwned)"
    cwd.mkdir()
    out, log = tmp_path / "argv.json", tmp_path / "logs" / "agent.log"
    pid_file, rc_file = tmp_path / "pid", tmp_path / "rc"
    rc_file.write_text("stale")
    code = (
        "import json,os,sys,time; print('hello', flush=True); "
        "seen = [sys.argv[2:], os.getcwd(), os.environ['GREETING']]; "
        "open(sys.argv[1],'w').write(json.dumps(seen)); "
        "time.sleep(0.5); sys.exit(5)"
    )
    pid = host.start_detached(
        [sys.executable, "-c", code, str(out), *HOSTILE],
        cwd=str(cwd), log_path=str(log), env={"GREETING": "$(touch pwned) 'x'"},
        pid_path=str(pid_file), rc_path=str(rc_file),
    )  # fmt: skip
    assert host.is_alive(pid)
    assert _wait_for(lambda: pid_file.exists()) and int(pid_file.read_text()) == pid
    assert _wait_for(lambda: rc_file.exists()) and rc_file.read_text().strip() == "5"
    assert _wait_for(lambda: not host.is_alive(pid))
    argv, where, greeting = json.loads(out.read_text())
    assert (argv, where, greeting) == (HOSTILE, str(cwd), "$(touch pwned) 'x'")
    assert log.read_text() == "hello\n"
    assert not list(tmp_path.rglob("pwned"))


def test_detached_process_is_in_its_own_session(host: LocalHost, tmp_path: Path) -> None:
    pid = host.start_detached(
        [sys.executable, "-c", "import time; time.sleep(2)"],
        cwd=str(tmp_path),
        log_path=str(tmp_path / "log"),
        pid_path=str(tmp_path / "pid"),
        rc_path=str(tmp_path / "rc"),
    )
    try:
        assert os.getsid(pid) == pid != os.getsid(0)
        assert LocalHost().is_alive(pid)  # a fresh host (after a controller restart) sees it too
    finally:
        os.killpg(pid, 9)
    assert _wait_for(lambda: not host.is_alive(pid))


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    assert not process_alive(2**22 + 12345)


def test_upload_download_skip_unchanged_and_hostile_names(host: LocalHost, tmp_path: Path) -> None:
    src = tmp_path / "data set"
    src.mkdir()
    for name in HOSTILE:
        (src / name).write_bytes(os.urandom(30_000))
    dst = tmp_path / "runs" / "r1 $(touch pwned)"
    first = host.upload(src, str(dst))
    assert sorted(p.name for p in dst.iterdir()) == sorted(HOSTILE)
    assert first.files_sent == len(HOSTILE) and first.bytes_sent >= first.total_size
    again = host.upload(src, str(dst))
    assert again.files_sent == 0 and again.bytes_sent < first.total_size * 0.01
    back = tmp_path / "back"
    host.download(str(dst), back)
    assert all((back / n).read_bytes() == (src / n).read_bytes() for n in HOSTILE)
    one = tmp_path / "single" / "x.bin"
    host.download(str(dst / HOSTILE[0]), one)
    assert one.read_bytes() == (src / HOSTILE[0]).read_bytes()
    assert not list(tmp_path.rglob("pwned"))
    with pytest.raises(TransportError, match="does not exist"):
        host.download(str(tmp_path / "nope"), back)


def test_download_includes_only_the_named_entries(host: LocalHost, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ckpt" / "inner").mkdir(parents=True)
    (run / "ckpt" / "inner" / "w.bin").write_bytes(b"w")
    for name in [*HOSTILE, "st*r[1].log", "stXr1.log", "other.txt"]:
        (run / name).write_text(name)
    wanted = [*HOSTILE, "st*r[1].log", "ckpt", "missing.log"]
    host.download(str(run), tmp_path / "back", includes=wanted)
    got = sorted(str(p.relative_to(tmp_path / "back")) for p in (tmp_path / "back").rglob("*"))
    assert got == sorted([*HOSTILE, "st*r[1].log", "ckpt", "ckpt/inner", "ckpt/inner/w.bin"])
    with pytest.raises(TransportError, match="not a directory"):
        host.download(str(run / "other.txt"), tmp_path / "x", includes=["a"])
    assert not list(tmp_path.rglob("pwned"))


def test_delete_is_guarded_and_stays_inside(host: LocalHost, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    dst = tmp_path / "runs" / "r1"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sibling.txt").write_text("keep")
    host.upload(src, str(dst))
    (dst / "stale.txt").write_text("old")
    host.upload(src, str(dst), delete=True)
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]
    assert (tmp_path / "runs" / "sibling.txt").read_text() == "keep"
    for bad in ["/", "/tmp", str(Path.home()), "~", "relative", ""]:
        with pytest.raises(ValueError, match="refusing rsync --delete"):
            host.upload(src, bad, delete=True)
