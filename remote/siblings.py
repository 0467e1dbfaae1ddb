"""The other runs on this machine: which of them still need it running.

Runs that share an instance (:mod:`remote.seats`) have their run dirs side by side under one
root. A watchdog about to stop the instance asks :func:`busy_siblings` first: stopping it would
end the other runs' training too.

A sibling is a directory next to this run's that holds a ``status.json``. It is busy when

* its state is not an ended one (``done``, ``stopped``, ``failed``),
* it has no ``released`` marker (the controller handed its machine on), and
* its ``status.json`` or ``heartbeat`` changed within ``grace_s``: its agent writes the status
  at least every few minutes while training and its controller touches the heartbeat at every
  poll, so a sibling whose agent died and whose controller is gone stops counting after the
  grace, and does not keep a stranger's machine billing forever.

The files are read as untrusted input. A ``status.json`` that cannot be read or is not a JSON
object with a string ``state`` means *not busy*, whatever its age: the agent writes it
atomically, so garbage there is not a live agent's, and the cheaper mistake is the one that
stops a machine (its disk survives a stop) rather than one that bills it with nobody watching.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from remote.status import FINISHED_STATES

ENDED_STATES = (*FINISHED_STATES, "failed")
# Written into a finished run's dir when its machine is handed to the batch's next run
# (``controller.run.handover``): the run's lingering watch ends, the next run's agent takes over.
RELEASED_MARKER = "released"
MAX_STATUS_BYTES = 1 << 20  # a real status.json is a few kB


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _state(status_file: Path) -> str | None:
    """The sibling's ``state``, or None when its status.json is unreadable or garbled."""
    try:
        with open(status_file, "rb") as fh:
            raw = fh.read(MAX_STATUS_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_STATUS_BYTES:
        return None
    try:
        status = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    state = status.get("state") if isinstance(status, dict) else None
    return state if isinstance(state, str) else None


def sibling_busy(directory: Path, *, grace_s: float, now: float) -> bool:
    """Whether the run in ``directory`` still needs the machine (see the module docstring)."""
    status_file = directory / "status.json"
    if (directory / RELEASED_MARKER).exists():
        return False
    state = _state(status_file)
    if state is None or state in ENDED_STATES:
        return False
    touched = [t for t in (_mtime(status_file), _mtime(directory / "heartbeat")) if t is not None]
    return bool(touched) and now - max(touched) <= grace_s


def busy_siblings(run_dir: Path, *, grace_s: float, now: float) -> list[str]:
    """Names of the busy run dirs next to ``run_dir`` (sorted; ``run_dir`` itself excluded)."""
    own = run_dir.resolve()
    try:
        entries = sorted(run_dir.parent.iterdir())
    except OSError:
        return []
    busy = []
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.resolve() == own:
                continue
        except OSError:
            continue
        if (entry / "status.json").is_file() and sibling_busy(entry, grace_s=grace_s, now=now):
            busy.append(entry.name)
    return busy
