"""Helpers shared by the fault tests (``tests/test_faults_*.py``) and the tally they feed.

Every fault test calls :func:`record` once with what it injected and what was left over; the
tally (``bench/fault_tally.py`` runs the fault tests with ``FLUX_REMOTE_FAULT_TALLY`` set to a
file) adds them up into the numbers ``docs/reliability.md`` shows: faults injected, orphans left,
artifacts lost, budget overruns. Without the variable, ``record`` only checks the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TALLY_ENV = "FLUX_REMOTE_FAULT_TALLY"


def record(name: str, *, faults: int = 1, orphans: int = 0, lost: int = 0,
           overruns: int = 0) -> None:
    """Count one fault test's result (appended as a JSON line when the tally is on)."""
    path = os.environ.get(TALLY_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": name, "faults": faults, "orphans": orphans,
                                 "lost": lost, "overruns": overruns}) + "\n")


def live_instances(fake: Any) -> list[int]:
    """FakeVast instances that still exist and are not stopped (would bill for compute).

    Stopped through the API means intended_status "stopped"; Vast then reports actual_status
    "exited", never "stopped" (tests/fakevast.py)."""
    return [iid for iid, inst in fake.instances.items()
            if inst.get("intended_status") != "stopped"]


def use_sshd_key(sshd: Any) -> None:
    """Make the sshd fixture's client key the controller's own key (``<state>/ssh``)."""
    home = Path(os.environ["FLUX_REMOTE_HOME"])
    (home / "ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(sshd.key_path, home / "ssh" / "id_ed25519")
    shutil.copy(f"{sshd.key_path}.pub", home / "ssh" / "id_ed25519.pub")
    os.chmod(home / "ssh" / "id_ed25519", 0o600)


def controller(*args: str, env: dict[str, str] | None = None,
               timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process (so that it can be SIGKILLed for real)."""
    return subprocess.run([sys.executable, "-m", "controller", *map(str, args)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for(predicate: Any, *, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true (real time: these wait on real processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class FakeClock:
    """A monotonic clock that only moves when something sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @property
    def slept(self) -> float:
        return sum(self.sleeps)
