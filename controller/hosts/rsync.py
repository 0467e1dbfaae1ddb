"""The rsync binary: argv building, ``--stats`` parsing, retries, and the ``--delete`` guard.

Shared by both hosts: :class:`~controller.hosts.local.LocalHost` calls it with plain paths,
:class:`~controller.hosts.ssh.SshHost` with ``user@host:path`` and an ``ssh`` command line.
File names never pass through a shell: rsync is run from an argv list and ``--protect-args``
(``-s``) sends remote paths inside the rsync protocol instead of the remote shell's command line.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from controller.errors import TransportError

PARTIAL_DIR = ".rsync-partial"
# rsync exit codes that mean "the connection went away": worth another try (resumes).
RETRYABLE_EXITS = frozenset({10, 12, 30, 35, 255})  # socket I/O, protocol stream, timeouts, ssh
# ... unless ssh itself says a retry cannot help.
FATAL_MARKS = ("Host key verification failed", "Permission denied", "command not found")
VANISHED_SOURCE = 24  # some source files vanished before they were sent: not an error
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0)
IO_TIMEOUT_S = 120  # rsync --timeout: a peer silent this long ends the attempt (exit 30)
# Wall-clock limit of one attempt: a host that trickles a byte now and then defeats --timeout.
ATTEMPT_TIMEOUT_S = 3 * 3600.0
# What comes home from an instance (a stranger's machine) creates nothing but regular files and
# directories with our own owner and default modes: no symlinks (a link in publish/ could point
# at any laptop file), no devices or specials, no permissions, owners or groups from the sender.
# rsync(1): --no-OPTION turns off an option implied by -a; --chmod applies to the received files.
INCOMING_FLAGS = ("--no-links", "--no-perms", "--no-owner", "--no-group", "--no-devices",
                  "--no-specials", "--chmod=D755,F644")

_STAT_LINES = {
    "files_sent": re.compile(r"^Number of regular files transferred:\s*([\d,.]+)", re.M),
    "total_size": re.compile(r"^Total file size:\s*([\d,.]+)", re.M),
    "wire_sent": re.compile(r"^Total bytes sent:\s*([\d,.]+)", re.M),
    "wire_received": re.compile(r"^Total bytes received:\s*([\d,.]+)", re.M),
}


@dataclass(frozen=True)
class TransferStats:
    """One transfer as rsync counted it.

    ``bytes_sent`` is what crossed the wire in the direction of the transfer (rsync's "Total bytes
    sent" when this side pushes, "Total bytes received" when it pulls) in the last, successful
    attempt;
    ``seconds`` is the wall time of all attempts; ``attempts`` counts them.
    """

    files_sent: int
    bytes_sent: int
    total_size: int
    seconds: float
    attempts: int = 1

    def to_dict(self) -> dict[str, float | int]:
        return {
            "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent,
            "total_size": self.total_size,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
        }


def _number(text: str) -> int:
    return int(re.sub(r"[,.]", "", text))


def parse_stats(output: str, *, pushing: bool, seconds: float = 0.0) -> TransferStats:
    """Read ``rsync --stats`` output; ``pushing`` is true when this side sends the data (an upload,
    and every local copy). Raises TransportError when the stats block is missing."""
    found = {key: pattern.search(output) for key, pattern in _STAT_LINES.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise TransportError(f"rsync printed no --stats block (missing {', '.join(missing)})")
    values = {key: _number(match.group(1)) for key, match in found.items() if match}
    return TransferStats(
        files_sent=values["files_sent"],
        bytes_sent=values["wire_sent"] if pushing else values["wire_received"],
        total_size=values["total_size"],
        seconds=seconds,
    )


def check_delete_target(path: str) -> str:
    """Return ``path`` normalised if ``rsync --delete`` may empty it; raise ValueError otherwise.

    Only an absolute directory at least two levels deep (``/workspace/flux-remote/<run>``) is
    accepted: never ``/``, ``~``, a relative path, ``..`` tricks, or a top-level folder such as
    ``/workspace`` or ``/root``.
    """
    if not path or not path.strip():
        raise ValueError("refusing rsync --delete: the destination is empty")
    if path.startswith("~"):
        raise ValueError(f"refusing rsync --delete into {path!r}: a home directory")
    if not path.startswith("/"):
        raise ValueError(f"refusing rsync --delete into {path!r}: not an absolute path")
    if ".." in path.split("/"):
        raise ValueError(f"refusing rsync --delete into {path!r}: it contains '..'")
    normal = posixpath.normpath(path)
    depth = len([part for part in normal.split("/") if part])
    if depth < 2:
        raise ValueError(
            f"refusing rsync --delete into {path!r}: the root or a top-level folder; "
            "give the run's own directory"
        )
    home = os.path.expanduser("~")
    if normal == posixpath.normpath(home) or (normal.startswith("/home/") and depth == 2):
        raise ValueError(f"refusing rsync --delete into {path!r}: a home directory")
    return normal


def _escaped(name: str) -> str:
    return "".join(f"\\{char}" if char in "*?[\\" else char for char in name)


def include_rules(names: Sequence[str]) -> list[str]:
    """Filter options that transfer only the entries ``names`` at the top of the source directory
    (a named directory with everything in it) and nothing else. A name must be one path
    component: ValueError for ``""``, ``.``, ``..`` or one with a ``/``.

    Each name matches only itself: rsync reads ``\\`` as an escape only in a pattern that holds
    a wildcard, so a name without ``*?[`` stays as it is and any other is escaped (the ``/***``
    rule, which also takes a directory's contents, always holds one).
    """
    rules = []
    for name in names:
        if not name or name in (".", "..") or "/" in name:
            raise ValueError(f"an include must name one entry of the directory, not {name!r}")
        plain = name if not any(char in name for char in "*?[") else _escaped(name)
        rules += [f"--include=/{plain}", f"--include=/{_escaped(name)}/***"]
    return [*rules, "--exclude=*"]


def rsync_argv(
    source: str,
    dest: str,
    *,
    ssh_command: str | None = None,
    delete: bool = False,
    excludes: Sequence[str] = (),
    includes: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    incoming: bool = False,
    max_bytes: int | None = None,
    filters: Sequence[str] = (),
) -> list[str]:
    """The rsync command line. ``source``/``dest`` are passed as they are (add trailing ``/``
    for "contents of"); ``ssh_command`` is the ``-e`` value for remote transfers. ``includes``
    (names of entries at the top of a source directory) limits the transfer to those entries;
    ``excludes`` still take precedence over them. ``incoming`` (a download from an instance)
    adds :data:`INCOMING_FLAGS`; ``max_bytes`` skips any file larger than that (``--max-size``).
    ``filters`` are rsync filter rules (``"+ */"``, ``"- *"``), applied after ``excludes``, with
    ``--prune-empty-dirs`` so a folder of skipped files is not created."""
    argv = [
        "rsync",
        "-a",
        "-s",  # --protect-args: remote paths travel in the protocol, not through a shell
        "--partial",
        f"--partial-dir={PARTIAL_DIR}",
        "--stats",
        "--no-motd",
        f"--timeout={IO_TIMEOUT_S}",
    ]
    if incoming:
        argv += INCOMING_FLAGS
    if max_bytes is not None:
        argv.append(f"--max-size={int(max_bytes)}")
    if ssh_command is not None:
        argv += ["-e", ssh_command]
    if delete:
        argv.append("--delete")
    argv += [f"--exclude={pattern}" for pattern in excludes]
    if includes is not None:
        argv += include_rules(includes)
    if filters:
        argv += [*(f"--filter={rule}" for rule in filters), "--prune-empty-dirs"]
    argv += list(extra)
    argv += ["--", source, dest]
    return argv


def _stderr_tail(stderr: str, lines: int = 15) -> str:
    return "\n".join(stderr.strip().splitlines()[-lines:]) or "(rsync printed nothing on stderr)"


def run_rsync(
    argv: Sequence[str],
    *,
    pushing: bool,
    where: str,
    retries: int = len(BACKOFF_S),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    before_attempt: Callable[[], None] | None = None,
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
) -> TransferStats:
    """Run rsync until it succeeds, retrying connection-level failures with backoff (each retry
    resumes from the partial files). ``before_attempt`` runs before each try (SshHost uses it to
    make sure the host key is pinned). An attempt running past ``attempt_timeout_s`` is killed and
not retried. Raises TransportError with rsync's stderr tail."""
    env = {**os.environ, "LC_ALL": "C"}  # numbers in --stats without locale separators
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        if before_attempt is not None:
            before_attempt()
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, errors="replace", env=env, check=False,
                timeout=attempt_timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"rsync {'to' if pushing else 'from'} {where} ran past {attempt_timeout_s:.0f} s "
                f"(attempt {attempt}) and was stopped",
                hint="a slow or stalling host; the next try resumes from the partial files",
            ) from exc
        except FileNotFoundError as exc:
            raise TransportError(
                "rsync is not installed on this machine", hint="install rsync (apt install rsync)"
            ) from exc
        ok = proc.returncode == 0 or (
            proc.returncode == VANISHED_SOURCE and "vanished" in proc.stderr
        )
        if ok:
            stats = parse_stats(proc.stdout, pushing=pushing, seconds=clock() - started)
            return TransferStats(
                stats.files_sent, stats.bytes_sent, stats.total_size, stats.seconds, attempt
            )
        fatal = any(mark in proc.stderr for mark in FATAL_MARKS)
        if proc.returncode in RETRYABLE_EXITS and not fatal and attempt <= retries:
            sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            continue
        raise TransportError(
            f"rsync {'to' if pushing else 'from'} {where} failed (exit {proc.returncode}, "
            f"attempt {attempt}):\n{_stderr_tail(proc.stderr)}",
            hint=_hint(proc.returncode, proc.stderr),
        )


def _hint(code: int, stderr: str) -> str | None:
    if "command not found" in stderr or code == 127:
        return "the other side has no rsync: install it there (apt-get install -y rsync)"
    if "Host key verification failed" in stderr:
        return "the host key differs from the pinned one in the state dir's known_hosts"
    if code in RETRYABLE_EXITS:
        return "the connection kept failing; the transfer resumes where it stopped on the next try"
    if code == 23:
        return "some files could not be transferred (permissions, disk full?)"
    return None
