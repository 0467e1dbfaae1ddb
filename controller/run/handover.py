"""A finished run gives its machine to the batch's next run instead of destroying it.

The batch (``controller.batch.scheduler``) passes a ``hand_over`` callback in the orchestrator's
options. When a run has ended and its machine is known good (:func:`machine_reusable`), the
orchestrator, after bringing the bundle home and verifying it, asks that callback for a taker:

1. ``released`` is written into the run dir: the agent's lingering watchdog
   (``remote.watchdog.linger``) sees it and ends, so it never stops the instance under the next run
   when this run's heartbeat goes stale;
2. the callback claims the next compatible slot, journals its run and moves the instance to it
   (``Provider.hand_over``: one journal transaction; the instance is relabelled on Vast);
3. this run's directory is removed from the instance (its bundle is home and verified), which
   frees the disk for the next run;
4. the next run starts on the same connection (``Taker.start``): no reconnect, no new rental.

A run whose machine failed it (runtime checks, the install, a full disk, an agent that vanished,
data that did not verify) never hands it over: that machine is destroyed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from controller.errors import FluxRemoteError
from controller.untrusted import text_field
from remote.watchdog import RELEASED_MARKER

if TYPE_CHECKING:
    from controller.providers.base import Machine
    from controller.run.follow import RunPaths


@dataclass
class Taker:
    """The run that took the machine (journaled as its owner already) and how to start it on
    that machine once the finished run has cleared its directory: ``start`` must be called."""

    run_id: str
    start: Callable[["Machine"], None]


HandOver = Callable[[str, "Machine"], "Taker | None"]
"""``hand_over(run_id, machine)``: the run that took the machine, or None (destroy it)."""

# Agent failure causes (``status.json`` ``cause``) that say the run, not the machine, was at
# fault: its spec, data or settings. Anything else (checks, bootstrap_command, disk_full,
# driver, python, import_error, internal, none at all) and the machine is destroyed.
RUN_CAUSES = frozenset({"dataset", "caption", "quality_gate", "validate", "publish", "resume",
                        "stopped", "trainer", "cuda_oom", "hf_auth", "missing_keys",
                        "corrupt_checkpoint"})


def machine_reusable(status: dict[str, Any], *, bundle_home: bool, untrusted: bool) -> bool:
    """Whether the machine the run ended on may serve the batch's next run."""
    if untrusted:
        return False
    state = text_field(status.get("state"), limit=40)
    if state in ("done", "stopped"):
        return bundle_home
    if state == "failed":
        return text_field(status.get("cause"), limit=80) in RUN_CAUSES
    return False


def mark_released(machine: "Machine", paths: "RunPaths") -> bool:
    """Tell the run's lingering watchdog that the machine has moved on; False when the instance
    did not take the write (then the machine is not handed over)."""
    try:
        machine.host.write_bytes(paths.file(RELEASED_MARKER), b"handed over\n")
    except FluxRemoteError:
        return False
    return True


def remove_run_dir(machine: "Machine", paths: "RunPaths") -> str | None:
    """Delete the finished run's directory from the instance; the error text when it failed
    (only disk is lost: the next run's checks see the free space)."""
    try:
        machine.host.run(f"rm -rf -- {shlex.quote(paths.run_dir)}", timeout=300, check=True)
    except FluxRemoteError as exc:
        return str(exc)
    return None
