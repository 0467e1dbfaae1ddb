"""The agent's watchdog: act when the laptop has gone quiet.

The controller touches ``heartbeat`` in the run dir at every poll. When it has been stale for
longer than ``heartbeat_grace_s`` and either the run has finished (bundle packed, or failed: nothing
more will happen) or the cap / ``max_hours`` is reached, the watchdog

* asks training to stop (the cost guard normally did already), and
* once the run is finished, stops its own instance through Vast with the per-instance
  ``CONTAINER_API_KEY`` (``PUT /api/v0/instances/$CONTAINER_ID/ {"state": "stopped"}``). Stop, not
  destroy: the disk and the bundle survive for a later ``flux-remote fetch``.

On Vast the variables are not in the agent's environment: SSH sessions do not get the
container's variables (docs.vast.ai, instances/docker-environment), so the onstart script writes
them to a 0600 file (``plan["instance"]["env_file"]``) that :func:`instance_env` reads; PID 1's
environment is the fallback. Without them (ssh or local provider) it only stops the training,
and on Vast the checks stage fails instead (nothing would stop a forgotten instance).
Every action is an event. Clock, sleep and the HTTP opener are injectable. After the run the agent exits (the
controller fetches when it does) and on Vast hands the watch to ``python -m remote.watchdog``
(:func:`linger`), which ends when the instance is stopped or a new agent starts on the run.

The instance is never stopped while another run on it is busy (runs sharing a multi-GPU
instance, :mod:`remote.seats`; the busy rule is :mod:`remote.siblings`): the watchdog journals one
``stop_instance_deferred`` event naming them and keeps watching, and stops the instance once
they have ended, been released or gone stale. With one run per machine there are no such
siblings (a run handed over before is ``released`` or removed).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

from remote.siblings import RELEASED_MARKER, busy_siblings

DEFAULT_VAST_URL = "https://console.vast.ai"
CHECK_INTERVAL_S = 30.0
INSTANCE_VARS = ("CONTAINER_ID", "CONTAINER_API_KEY", "VAST_URL")


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _pid1_env(path: Path = Path("/proc/1/environ")) -> dict[str, str]:
    try:
        raw = path.read_bytes()
    except OSError:
        return {}
    pairs = (item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0")
             if "=" in item)
    return {key: value for key, value in pairs}


def instance_env(plan: Mapping[str, Any], env: Mapping[str, str], *,
                 pid1_environ: Path = Path("/proc/1/environ")) -> dict[str, str]:
    """``env`` plus the container variables: from the environment itself, else the file the
    onstart script wrote, else PID 1's environment (each only when it has both id and key)."""
    merged = dict(env)
    if merged.get("CONTAINER_ID") and merged.get("CONTAINER_API_KEY"):
        return merged
    env_file = (plan.get("instance") or {}).get("env_file")
    for source in (_read_env_file(Path(env_file)) if env_file else {}, _pid1_env(pid1_environ)):
        if source.get("CONTAINER_ID") and source.get("CONTAINER_API_KEY"):
            merged.update({k: source[k] for k in INSTANCE_VARS if source.get(k)})
            break
    return merged


def stop_instance_request(env: Mapping[str, str]) -> urllib.request.Request | None:
    """The self-stop request for this instance, or None without the Vast variables."""
    key, container = env.get("CONTAINER_API_KEY"), env.get("CONTAINER_ID")
    if not key or not container:
        return None
    base = (env.get("VAST_URL") or DEFAULT_VAST_URL).rstrip("/")
    return urllib.request.Request(
        f"{base}/api/v0/instances/{container}/", method="PUT",
        data=json.dumps({"state": "stopped"}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


class Watchdog:
    """Checks the heartbeat; ``check_once`` does one round, ``start`` runs it in a thread."""

    def __init__(self, run_dir: Path, *, grace_s: float, env: Mapping[str, str],
                 event: Callable[..., None], is_finished: Callable[[], bool],
                 cap_reached: Callable[[], bool], stop_training: Callable[[str], None],
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 opener: Callable[..., Any] = urllib.request.urlopen,
                 interval_s: float = CHECK_INTERVAL_S) -> None:
        self.heartbeat = run_dir / "heartbeat"
        self.grace_s = grace_s
        self.env = env
        self.event = event
        self.is_finished = is_finished
        self.cap_reached = cap_reached
        self.stop_training = stop_training
        self.clock = clock
        self.sleep = sleep
        self.opener = opener
        self.interval_s = interval_s
        self.started_at = clock()
        self.instance_stopped = False
        self.run_dir = run_dir
        self._deferred_for: list[str] = []  # the busy siblings last journaled
        self._training_stop_sent = False
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    @property
    def can_stop_instance(self) -> bool:
        return stop_instance_request(self.env) is not None

    def silence_s(self) -> float:
        """Seconds since the controller last touched ``heartbeat`` (or since the agent started)."""
        try:
            last = os.stat(self.heartbeat).st_mtime
        except OSError:
            last = self.started_at
        return self.clock() - max(last, self.started_at)

    def check_once(self) -> str | None:
        """One round; returns the action taken ("stop_training", "stop_instance") or None."""
        silence = self.silence_s()
        if silence <= self.grace_s or self.instance_stopped:
            return None
        if self.is_finished():
            if self.can_stop_instance and not self._siblings_busy(silence):
                return "stop_instance" if self._stop_instance(silence) else None
            return None
        if self.cap_reached() and not self._training_stop_sent:
            self._training_stop_sent = True
            self.event("watchdog", action="stop_training", silence_s=round(silence),
                       reason="cap or max_hours reached while the controller is silent")
            self.stop_training("watchdog: cap reached and the controller is silent")
            return "stop_training"
        return None

    def _siblings_busy(self, silence: float) -> bool:
        """Another run on this machine is busy: journal it (once per set of runs), don't stop."""
        busy = busy_siblings(self.run_dir, grace_s=self.grace_s, now=self.clock())
        if busy and busy != self._deferred_for:
            self.event("watchdog", action="stop_instance_deferred", siblings=busy,
                       silence_s=round(silence))
        self._deferred_for = busy
        return bool(busy)

    def _stop_instance(self, silence: float) -> bool:
        request = stop_instance_request(self.env)
        assert request is not None
        try:
            with self.opener(request, timeout=30) as response:
                code = response.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except (urllib.error.URLError, OSError) as exc:
            self.event("watchdog", action="stop_instance", ok=False, error=str(exc),
                       silence_s=round(silence))
            return False
        ok = 200 <= code < 300
        self.event("watchdog", action="stop_instance", ok=ok, http_status=code,
                   silence_s=round(silence))
        self.instance_stopped = ok
        return ok

    # -- threading ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()

    def _loop(self) -> None:
        while not self._halt.is_set():
            self.check_once()
            self._halt.wait(self.interval_s)

    def wait_for_stop(self, *, max_s: float | None = None,
                      keep_going: Callable[[], bool] = lambda: True) -> bool:
        """After the run: keep checking (in this thread) until the instance is stopped.

        Only meaningful on Vast; returns False at once without the variables, after ``max_s``,
        or as soon as ``keep_going()`` turns false.
        """
        if not self.can_stop_instance:
            return False
        begun = self.clock()
        while not self.instance_stopped:
            if max_s is not None and self.clock() - begun >= max_s:
                return False
            if not keep_going():
                return False
            if self.check_once() is None:
                self.sleep(self.interval_s)
        return True


def linger(plan: dict[str, Any], *, env: Mapping[str, str],
           clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
           opener: Callable[..., Any] = urllib.request.urlopen, max_s: float | None = None) -> bool:
    """Watch a run that has ended until the instance is stopped, a new agent takes over, or the
    machine is handed to another run (``released`` in the run dir, or the run dir removed).

    The agent itself exits when its run ends (the controller takes that as the signal to fetch),
    so on Vast it hands this job to a detached ``python -m remote.watchdog PLAN.json``.
    """
    from remote.status import FINISHED_STATES, append_event, read_status

    run_dir = Path(plan["run_dir"])
    grace = float(plan.get("heartbeat_grace_s") or 900)

    def ended() -> bool:
        if (run_dir / RELEASED_MARKER).exists():
            return False  # the machine serves another run now: its own agent watches it
        return (read_status(run_dir) or {}).get("state") in (*FINISHED_STATES, "failed")

    dog = Watchdog(run_dir, grace_s=grace, env=instance_env(plan, env),
                   event=lambda kind, **data: append_event(run_dir, kind, clock=clock, **data),
                   is_finished=ended, cap_reached=lambda: False, stop_training=lambda _: None,
                   clock=clock, sleep=sleep, opener=opener,
                   interval_s=min(CHECK_INTERVAL_S, max(grace / 3, 0.1)))
    return dog.wait_for_stop(max_s=max_s, keep_going=ended)


def main(argv: list[str] | None = None) -> int:
    """``python -m remote.watchdog PLAN.json``: 0 once the instance is stopped, 1 otherwise."""
    import sys

    from remote.plan import PlanError, load_plan

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m remote.watchdog PLAN.json", file=sys.stderr)
        return 2
    try:
        plan = load_plan(args[0])
    except PlanError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0 if linger(plan, env=os.environ) else 1


if __name__ == "__main__":
    raise SystemExit(main())
