"""rsync argv, --stats parsing, the --delete guard and the retry policy (a fake rsync script)."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest

from controller.errors import TransportError
from controller.hosts.rsync import (
    PARTIAL_DIR,
    check_delete_target,
    include_rules,
    parse_stats,
    rsync_argv,
    run_rsync,
)
from controller.hosts.ssh import SshTarget, ssh_argv

STATS_31 = """
Number of files: 4 (reg: 3, dir: 1)
Number of created files: 3 (reg: 3)
Number of deleted files: 0
Number of regular files transferred: 3
Total file size: 104,857,600 bytes
Total transferred file size: 104,857,600 bytes
Literal data: 104,857,600 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 104,883,318
Total bytes received: 76

sent 104,883,318 bytes  received 76 bytes  41,953,357.60 bytes/sec
total size is 104,857,600  speedup is 1.00
"""

STATS_30 = """
Number of files: 2
Number of files transferred: 0
Number of regular files transferred: 0
Total file size: 1234 bytes
Total transferred file size: 0 bytes
Total bytes sent: 55
Total bytes received: 12
"""


def test_parse_stats_with_and_without_separators() -> None:
    up = parse_stats(STATS_31, pushing=True, seconds=2.5)
    assert (up.files_sent, up.bytes_sent, up.total_size, up.seconds) == (
        3,
        104_883_318,
        104_857_600,
        2.5,
    )
    assert parse_stats(STATS_31, pushing=False).bytes_sent == 76
    old = parse_stats(STATS_30, pushing=True)
    assert (old.files_sent, old.bytes_sent, old.total_size) == (0, 55, 1234)
    assert up.to_dict()["bytes_sent"] == 104_883_318


def test_parse_stats_without_a_stats_block_is_an_error() -> None:
    with pytest.raises(TransportError, match="no --stats"):
        parse_stats("sending incremental file list\n", pushing=True)


def test_argv_is_resumable_protected_and_ends_options() -> None:
    argv = rsync_argv(
        "a b/", "h:/x y", ssh_command="ssh -p 2", delete=True, excludes=["*.tmp", "--evil"]
    )
    assert argv[:2] == ["rsync", "-a"]
    assert {"-s", "--partial", f"--partial-dir={PARTIAL_DIR}", "--stats", "--delete"} <= set(argv)
    assert argv[argv.index("-e") + 1] == "ssh -p 2"
    assert "--exclude=--evil" in argv and argv[-3:] == ["--", "a b/", "h:/x y"]
    assert "--delete" not in rsync_argv("a/", "b")


def test_includes_pick_top_level_entries_literally_and_exclude_the_rest() -> None:
    argv = rsync_argv("a/", "b", excludes=["*.tmp"], includes=["agent.log", "c*k[1]\\x"])
    rules = argv[argv.index("--exclude=*.tmp"):argv.index("--")]
    assert rules == ["--exclude=*.tmp", "--include=/agent.log", "--include=/agent.log/***",
                     "--include=/c\\*k\\[1]\\\\x", "--include=/c\\*k\\[1]\\\\x/***",
                     "--exclude=*"]
    assert include_rules([]) == ["--exclude=*"]
    assert not any(a.startswith("--include") for a in rsync_argv("a/", "b"))
    for bad in ["", ".", "..", "a/b", "/abs"]:
        with pytest.raises(ValueError, match="one entry"):
            include_rules([bad])


def test_ssh_options_pin_the_host_key_and_use_only_our_key(tmp_path: Path) -> None:
    target = SshTarget(
        "10.0.0.5", 40022, "root", tmp_path / "my key", tmp_path / "state dir" / "known_hosts"
    )
    argv = ssh_argv(target, connect_timeout=7)
    joined = " ".join(argv)
    for option in (
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "ConnectTimeout=7",
    ):
        assert option in joined
    assert argv[argv.index("-i") + 1] == str(tmp_path / "my key")
    assert argv[argv.index("-p") + 1] == "40022"
    assert f'UserKnownHostsFile="{tmp_path}/state dir/known_hosts"' in argv
    assert shlex.split(shlex.join(argv)) == argv  # survives rsync's -e word splitting


@pytest.mark.parametrize(
    "path", ["/workspace/flux-remote/run1", "/workspace/flux-remote/run1/", "/tmp/x/y"]
)
def test_delete_guard_accepts_run_directories(path: str) -> None:
    assert check_delete_target(path) == path.rstrip("/")


@pytest.mark.parametrize(
    "path",
    [
        "",
        " ",
        "/",
        "//",
        "~",
        "~/runs",
        "runs/r1",
        ".",
        "/workspace",
        "/root",
        "/a/../",
        "/a/../b",
        "/home/user",
    ],
)
def test_delete_guard_refuses_roots_homes_and_relative_paths(path: str) -> None:
    with pytest.raises(ValueError, match="refusing rsync --delete"):
        check_delete_target(path)


def _fake_rsync(
    tmp_path: Path,
    exits: list[int],
    stderr: str = "rsync: connection unexpectedly closed",
    stats_on_fail: bool = False,
) -> list[str]:
    """A script that fails with ``exits`` in turn (one per call), then prints a stats block."""
    on_fail = f"cat <<'EOF'\n{STATS_30}EOF\n" if stats_on_fail else ""
    counter = tmp_path / "calls"
    counter.write_text("0")
    codes = " ".join(str(c) for c in exits)
    script = tmp_path / "rsync"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {shlex.quote(str(counter))}); echo $((n+1)) > {shlex.quote(str(counter))}\n"
        f"set -- {codes}\n"
        "shift $n 2>/dev/null || set --\n"
        f'if [ -n "$1" ]; then\n{on_fail}echo {shlex.quote(stderr)} >&2; exit "$1"; fi\n'
        f"cat <<'EOF'\n{STATS_30}EOF\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)]


def test_connection_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []
    hooks: list[int] = []
    stats = run_rsync(
        _fake_rsync(tmp_path, [255, 12, 30]), pushing=True, where="h", sleep=sleeps.append,
        before_attempt=lambda: hooks.append(1),
    )  # fmt: skip
    assert stats.attempts == 4 and sleeps == [1.0, 2.0, 4.0] and len(hooks) == 4


def test_retries_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="exit 255, attempt 3") as info:
        run_rsync(
            _fake_rsync(tmp_path, [255] * 9),
            pushing=True,
            where="h",
            retries=2,
            sleep=lambda s: None,
        )
    assert "connection unexpectedly closed" in str(info.value)


@pytest.mark.parametrize("code", [23, 1, 11])
def test_other_failures_raise_at_once_with_the_stderr_tail(tmp_path: Path, code: int) -> None:
    sleeps: list[float] = []
    with pytest.raises(TransportError, match=f"exit {code}, attempt 1"):
        run_rsync(_fake_rsync(tmp_path, [code]), pushing=True, where="h", sleep=sleeps.append)
    assert sleeps == []


def test_a_changed_host_key_is_not_retried(tmp_path: Path) -> None:
    argv = _fake_rsync(tmp_path, [255], stderr="Host key verification failed.")
    with pytest.raises(TransportError, match="Host key verification failed") as info:
        run_rsync(argv, pushing=True, where="h", sleep=lambda s: None)
    assert "pinned" in str(info.value)


def test_vanished_source_files_are_not_an_error_but_other_24s_are(tmp_path: Path) -> None:
    vanished = _fake_rsync(tmp_path, [24], stderr="file has vanished: /x/y.jpg", stats_on_fail=True)
    assert run_rsync(vanished, pushing=True, where="h", sleep=lambda s: None).attempts == 1
    other = _fake_rsync(tmp_path, [24], stderr="something else", stats_on_fail=True)
    with pytest.raises(TransportError, match="exit 24"):
        run_rsync(other, pushing=True, where="h", sleep=lambda s: None)


def test_missing_rsync_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="not installed"):
        run_rsync([str(tmp_path / "no-rsync")], pushing=True, where="h")
