"""A trainer left behind by a killed agent must not train next to the new one.

The trainer runs in a session of its own (:mod:`remote.train`), so a SIGKILL of the agent leaves
it running until its next write to the vanished pipe fails. :func:`reap_orphans` ends it: the
process group recorded in ``work/trainer.pid`` when that file exists and its leader's command line
still names the run's config (a reused pid is left alone), else every process whose command line
names the config (:func:`trainer_pids`, for runs begun before the pid file existed).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from remote.train import read_pid_file

PID_FILE = "trainer.pid"  # in the run's work/ dir


def trainer_pids(config_path: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Processes whose command line names ``config_path``: a trainer a killed agent left behind."""
    pids = []
    for entry in proc_root.iterdir() if proc_root.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _names(entry / "cmdline", config_path):
            pids.append(int(entry.name))
    return pids


def _names(cmdline: Path, config_path: Path) -> bool:
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config_path).encode() in argv


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    """Some process of group ``pgid`` still exists (zombies count: their parent has not waited)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Leftover:
    """What was found: the pid file's group, or the pids the scan found."""

    source: str  # "pid_file" | "scan"
    pids: list[int] = field(default_factory=list)
    pgid: int | None = None


def find_leftover(pid_file: Path, config_path: Path | None,
                  proc_root: Path = Path("/proc")) -> Leftover | None:
    """The leftover trainer of this run, if one is still alive.

    A pid file whose pid is gone, or now names another program (pid reuse), is stale: nothing
    is left (the scan is only for runs without a pid file).
    """
    record = read_pid_file(pid_file)
    if record is not None:
        config = Path(record["config"])
        if alive(record["pid"]) and _names(proc_root / str(record["pid"]) / "cmdline", config):
            return Leftover("pid_file", [record["pid"]], record["pgid"])
        return None
    if config_path is None:
        return None
    pids = trainer_pids(config_path, proc_root)
    return Leftover("scan", pids) if pids else None


def end_leftover(leftover: Leftover, *, wait_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Give it ``wait_s`` to die by itself (its output pipe is gone, so it dies at its next write,
    and it may be in the middle of a save), then SIGTERM, then SIGKILL: to the whole group when
    the pid file named it, else to each pid."""
    pgid = leftover.pgid

    def living() -> list[int]:
        if pgid is not None:
            return [pgid] if group_alive(pgid) and any(alive(p) for p in _group(pgid)) else []
        return [pid for pid in leftover.pids if alive(pid)]

    for sig, patience in ((None, wait_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        targets = living()
        if not targets:
            return
        for target in targets if sig else []:
            try:
                if pgid is not None:
                    os.killpg(target, sig)
                else:
                    os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = monotonic() + patience
        while monotonic() < deadline and living():
            sleep(0.2)


def _group(pgid: int, proc_root: Path = Path("/proc")) -> list[int]:
    """The pids of group ``pgid`` (from ``/proc/<pid>/stat``; the group's leader may be gone)."""
    members = []
    for entry in proc_root.iterdir() if proc_root.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members
