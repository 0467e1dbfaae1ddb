"""Run ids and the run lifecycle's named states.

A run moves ``planned -> renting -> booting -> shipping -> running -> fetching`` and ends
``done``, ``failed``, ``stopped`` or ``budget`` (the budget ended it: the controller's cap, the
agent's cost guard, or no offer the money left could finish on; its result is what fitted,
see docs/launch.md). Each state names the step that still has to happen, so a
controller that died can look at the state and carry on from there (``controller.run.orchestrator``).
"""

from __future__ import annotations

import fcntl
import json
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from controller.errors import RunError

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.spec.model import RunSpec

PLANNED = "planned"
RENTING = "renting"
BOOTING = "booting"
SHIPPING = "shipping"
RUNNING = "running"
FETCHING = "fetching"
DONE = "done"
FAILED = "failed"
STOPPED = "stopped"
BUDGET = "budget"

ACTIVE_STATES = (PLANNED, RENTING, BOOTING, SHIPPING, RUNNING, FETCHING)
TERMINAL_STATES = (DONE, FAILED, STOPPED, BUDGET)


def new_run_id(name: str, *, now: float | None = None, suffix: str | None = None) -> str:
    """``<name>-<yyyymmdd-hhmmss>-<4 hex>`` in UTC, e.g. ``demo-20261129-184000-3fa2``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{name}-{stamp}-{suffix or secrets.token_hex(2)}"


def instance_label(run_id: str) -> str:
    """The provider label every instance of a run carries, so it can always be found again."""
    return f"flux-remote:{run_id}"


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


# How the agent names a stop its own budget caused: remote/stages/training.py ``cap_stop("cost
# guard: ...")``, remote/runner.py ``stop_now`` and remote/watchdog.py ``check_once``.
BUDGET_STOP_PREFIXES = ("cost guard", "watchdog: cap reached")


def stopped_state(*, cap_stopped: bool, stop_reason: str | None) -> str:
    """The state of a run whose agent ended ``stopped``: ``budget`` when the controller's cap
    asked for the stop (``cap_stopped``) or the agent's own cost guard stopped training (its
    ``stop_reason``), else ``stopped`` (the user asked). Only the label depends on the agent's
    word here: the bundle, its verification and the fetch are the same either way."""
    if cap_stopped or (stop_reason or "").startswith(BUDGET_STOP_PREFIXES):
        return BUDGET
    return STOPPED


class RunLockedError(RunError):
    """Another controller process is driving this run right now."""


@contextmanager
def run_lock(journal: "Journal", run_id: str) -> Iterator[None]:
    """Only one controller process drives a run at a time: an flock next to the journal, which
    the kernel drops with its holder, so a SIGKILLed controller never blocks ``resume``."""
    folder = Path(journal.path).parent / "locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / f"{run_id}.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RunLockedError(f"run {run_id} is being driven by another flux-remote process",
                                 hint=f"watch it with `flux-remote status {run_id}`; "
                                      f"`flux-remote stop {run_id}` asks it to finish") from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def spec_of(run: dict[str, Any]) -> "RunSpec":
    """The spec the user launched, as the journal keeps it (never the copy the instance wrote)."""
    from controller.spec.model import RunSpec

    return RunSpec.model_validate(json.loads(run["spec_json"]))
