"""Run ids and the run lifecycle's named states.

A run moves ``planned -> renting -> booting -> shipping -> running -> fetching`` and ends
``done``, ``failed`` or ``stopped``. Each state names the step that still has to happen, so a
controller that died can look at the state and carry on from there (``controller.orchestrator``).
"""

from __future__ import annotations

import secrets
import time

PLANNED = "planned"
RENTING = "renting"
BOOTING = "booting"
SHIPPING = "shipping"
RUNNING = "running"
FETCHING = "fetching"
DONE = "done"
FAILED = "failed"
STOPPED = "stopped"

ACTIVE_STATES = (PLANNED, RENTING, BOOTING, SHIPPING, RUNNING, FETCHING)
TERMINAL_STATES = (DONE, FAILED, STOPPED)


def new_run_id(name: str, *, now: float | None = None, suffix: str | None = None) -> str:
    """``<name>-<yyyymmdd-hhmmss>-<4 hex>`` in UTC, e.g. ``demo-20261129-184000-3fa2``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{name}-{stamp}-{suffix or secrets.token_hex(2)}"


def instance_label(run_id: str) -> str:
    """The provider label every instance of a run carries, so it can always be found again."""
    return f"flux-remote:{run_id}"


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES
