"""Waiting for a Vast.ai instance to run: a small state machine with a deadline per phase.

``actual_status`` goes null/created (provisioning) -> loading (image pull) -> running. Vast
states that never turn into running (exited, unknown, offline), ``intended_status == stopped``
and an error-looking ``status_msg`` (an image that cannot be pulled) fail at once; a phase that
lasts longer than its deadline fails too. Every failure is an ``InstanceNotReadyError``
carrying the instance id, so the caller can destroy it and try the next offer. A state this
module does not know maps to UNKNOWN and is waited on under the deadline of the phase before it.

Whether SSH answers is the transport's job; this module returns once Vast says "running" and
the instance reports an SSH endpoint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Protocol

from controller.errors import ProviderError
from controller.vast.errors import InstanceNotReadyError


class Phase(str, Enum):
    PROVISIONING = "provisioning"
    LOADING = "loading"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    GONE = "gone"
    UNKNOWN = "unknown"


_PHASES = {
    None: Phase.PROVISIONING,
    "": Phase.PROVISIONING,
    "created": Phase.PROVISIONING,
    # A start of a stopped instance waits for its GPU here (vast-cli `start instance` epilog).
    "scheduling": Phase.PROVISIONING,
    "loading": Phase.LOADING,
    "rebooting": Phase.LOADING,
    "running": Phase.RUNNING,
    "stopped": Phase.STOPPED,
    "frozen": Phase.STOPPED,
    # Vast's own "unknown" is a host that stopped reporting; like exited/offline it never runs.
    "exited": Phase.FAILED,
    "unknown": Phase.FAILED,
    "offline": Phase.FAILED,
}

# Daemon / pull failures seen in status_msg ("Error response from daemon: manifest ... not found").
_ERROR_MSG = re.compile(
    r"error|failed|failure|not found|denied|unauthorized|manifest unknown|no space left|"
    r"cannot|could not|unable to|invalid",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Deadlines:
    """Seconds each phase may last before the instance is given up on."""

    provisioning_s: float = 600.0  # null/created: the host accepts the contract
    loading_s: float = 1800.0  # image pull; a big image on a slow host can take many minutes
    running_s: float = 300.0  # running, but intended_status or the SSH endpoint not there yet
    poll_s: float = 5.0  # between two looks (the client spaces show calls >= 2 s anyway)

    def for_phase(self, phase: Phase) -> float:
        if phase is Phase.LOADING:
            return self.loading_s
        if phase is Phase.RUNNING:
            return self.running_s
        return self.provisioning_s


class _Shows(Protocol):
    def show_instance(self, instance_id: int) -> dict[str, Any] | None: ...


def phase_of(instance: dict[str, Any] | None) -> Phase:
    """The phase an instance record is in; states we do not know are UNKNOWN, never an error."""
    if instance is None:
        return Phase.GONE
    status = instance.get("actual_status")
    if status is not None and not isinstance(status, str):
        return Phase.UNKNOWN
    return _PHASES.get(status.lower() if isinstance(status, str) else None, Phase.UNKNOWN)


def failure_reason(instance: dict[str, Any]) -> str | None:
    """Why this instance will never run, or None while it still may."""
    phase = phase_of(instance)
    status = instance.get("actual_status")
    msg = str(instance.get("status_msg") or "").strip()
    if phase is Phase.FAILED:
        return f"instance is {status}" + (f": {msg}" if msg else "")
    if str(instance.get("intended_status") or "").lower() == "stopped":
        return "Vast stopped it (intended_status is stopped)" + (f": {msg}" if msg else "")
    if msg and phase is not Phase.RUNNING and _ERROR_MSG.search(msg):
        return f"host reports an error: {msg}"
    return None


def ssh_endpoint(instance: dict[str, Any]) -> tuple[str, int]:
    """Where to SSH as root: the direct port when mapped, else Vast's SSH proxy."""
    ports = instance.get("ports")
    if isinstance(ports, dict):
        mapped = ports.get("22/tcp") or []
        ip = instance.get("public_ipaddr")
        if mapped and ip and isinstance(mapped[0], dict) and mapped[0].get("HostPort"):
            return str(ip).strip(), int(mapped[0]["HostPort"])
    host, port = instance.get("ssh_host"), instance.get("ssh_port")
    if host and port:
        return str(host), int(port)
    raise ProviderError(f"instance {instance.get('id')} reports no SSH endpoint yet")


def has_ssh_endpoint(instance: dict[str, Any]) -> bool:
    try:
        ssh_endpoint(instance)
    except ProviderError:
        return False
    return True


def is_ready(instance: dict[str, Any]) -> bool:
    """Running as intended, with an SSH endpoint (whether SSH answers is checked separately)."""
    return (
        phase_of(instance) is Phase.RUNNING
        and str(instance.get("intended_status") or "running").lower() == "running"
        and has_ssh_endpoint(instance)
    )


def wait_until_running(
    client: _Shows,
    instance_id: int,
    *,
    deadlines: Deadlines | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_change: Callable[[Phase, dict[str, Any]], None] | None = None,
    unlisted_grace_s: float = 0.0,
) -> dict[str, Any]:
    """Poll until the instance is ready and return its record.

    Raises InstanceNotReadyError (with ``instance_id``) when it fails, disappears, or stays in
    one phase past its deadline. ``on_change(phase, instance)`` is called on each phase change.
    ``unlisted_grace_s``: right after a create Vast may answer ``{"instances": null}`` for a
    while; until this many seconds have passed that means "not listed yet", not "gone".
    """
    limits = deadlines or Deadlines()
    timed_phase: Phase | None = None  # the phase whose deadline runs (UNKNOWN keeps the last)
    seen: Phase | None = None
    began = phase_started = clock()
    while True:
        inst = client.show_instance(instance_id)
        if inst is None and seen is None and clock() - began < unlisted_grace_s:
            sleep(limits.poll_s)
            continue
        if inst is None:
            raise InstanceNotReadyError(f"instance {instance_id} disappeared while starting",
                                        instance_id=instance_id, reason="gone")
        phase = phase_of(inst)
        reason = failure_reason(inst)
        if reason:
            raise InstanceNotReadyError(f"instance {instance_id} failed to start: {reason}",
                                        instance_id=instance_id, reason=reason, instance=inst)
        if is_ready(inst):
            if on_change and phase is not seen:
                on_change(phase, inst)
            return inst
        if phase is not seen:
            seen = phase
            if on_change:
                on_change(phase, inst)
        if phase is not Phase.UNKNOWN and phase is not timed_phase:
            timed_phase = phase
            phase_started = clock()
        current = timed_phase or Phase.PROVISIONING
        limit = limits.for_phase(current)
        waited = clock() - phase_started
        if waited > limit:
            status = inst.get("actual_status")
            raise InstanceNotReadyError(
                f"instance {instance_id} stuck in {current.value} (actual_status={status!r}) "
                f"for more than {limit:.0f} s",
                instance_id=instance_id, reason=f"deadline:{current.value}", instance=inst,
            )
        sleep(limits.poll_s)
