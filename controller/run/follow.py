"""Following a running agent: poll, meter spend, enforce the cap, tail the log.

Each poll, over the host's one kept-alive connection: read ``status.json``, read ``agent.log``
from the byte offset reached so far (only whole lines are shown; the offset is journaled, so a
reattaching controller neither repeats nor skips a line), touch ``heartbeat``, and meter spend
from the moment billing started: ``dph_total x wall time + bandwidth``.

Controller-side cap: when the metered spend plus what the next poll interval and the finish
(checkpoint, publish, fetch, destroy: ``finish_allowance_s``) would cost reaches the budget, the
follower writes ``STOP`` once, as JSON ``{"kind": ..., "reason": ...}``: ``graceful`` (the agent
checkpoints, publishes what exists and ends) or, with ``budget.on_cap: hard_stop``, ``hard`` (the
agent stops its trainer at once, as its own cost guard does; see ``remote.stop_request``).
A hard stop needs no checkpoint, so its finish is only publish, fetch and destroy: the cap then
reserves ``HARD_FINISH_ALLOWANCE_S`` (or a smaller ``finish_allowance_s``), and training runs
that much longer.

With a ``checkpoint_dir`` (``publish.fetch_checkpoints``), each new ``last_checkpoint`` the agent
reports is downloaded into it while training goes on, and the one brought home before it is then
deleted: the newest checkpoint is always on this machine, should the host die. A failed download
is tried again at the next poll; once the agent has ended the bundle fetch takes over.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from controller.errors import RunError, TransportError
from controller.hosts.ssh import Unreachable
from controller.untrusted import (UntrustedInput, clean_text, decode, inside_run_dir, integer,
                                  number, text_field)
from remote.progress import checkpoint_step
from remote.stop_request import GRACEFUL, HARD, StopRequest

if TYPE_CHECKING:
    from controller.hosts.base import Host
    from controller.journal import Journal

AGENT_TERMINAL = ("done", "failed", "stopped")
FINISH_ALLOWANCE_S = 600.0  # time the agent needs after STOP, plus fetch and destroy
HARD_FINISH_ALLOWANCE_S = 180.0  # after a hard STOP: publish what exists, fetch, destroy
LOST_CONTACT_S = 600.0  # give up following after this long without one good poll
SPEND_SAMPLE_S = 30.0  # a spend sample is journaled at most this often (the total every poll)
CHECKPOINT_FETCHED = "checkpoint_fetched"  # journal event: {"path", "local", "step"}
STATUS_MAX_BYTES = 1 << 20  # a real status.json is a few kB; a bigger one is not read
LOG_CHUNK_MAX_BYTES = 1 << 20  # at most this much of agent.log per poll (the rest next poll)
LOG_LINE_MAX_CHARS = 4000  # a longer log line is cut before it is shown


class MachineLost(RunError):
    """The provider says the run's machine is gone or will not come back (outbid, exited)."""


class StopIgnored(RunError):
    """The cap's STOP went unanswered for its grace period: the instance must be stopped from
    home, through the provider's API (the agent, or whatever replaced it, ignores STOP)."""


class Reporter(Protocol):
    """Where the orchestrator reports to (the rich live view, a JSON log, a test recorder)."""

    def note(self, text: str) -> None: ...

    def update(self, snap: "Snapshot") -> None: ...

    def log(self, lines: list[str]) -> None: ...


class NullReporter:
    def note(self, text: str) -> None:
        return None

    def update(self, snap: "Snapshot") -> None:
        return None

    def log(self, lines: list[str]) -> None:
        return None


@dataclass
class Snapshot:
    """One poll's view of the run, as the live panel shows it."""

    run_id: str
    agent_state: str | None = None  # status.json "state"; None before the agent wrote one
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    s_per_step: float | None = None
    eta_s: float | None = None
    spend_usd: float = 0.0
    budget_usd: float = 0.0
    price_per_hour: float = 0.0
    elapsed_s: float = 0.0
    stop_requested: bool = False
    agent_alive: bool | None = None
    agent_rc: int | None = None
    error: str | None = None
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """The agent has ended (its exit code is recorded or its process is gone)."""
        return self.agent_rc is not None or self.agent_alive is False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("status")
        return data


@dataclass(frozen=True)
class RunPaths:
    """Files of the agent's run directory on its host (the contract in DESIGN.md)."""

    run_dir: str

    def file(self, name: str) -> str:
        return f"{self.run_dir}/{name}"

    @property
    def plan(self) -> str:
        return self.file("plan.json")

    @property
    def status(self) -> str:
        return self.file("status.json")

    @property
    def log(self) -> str:
        return self.file("agent.log")

    @property
    def heartbeat(self) -> str:
        return self.file("heartbeat")

    @property
    def stop(self) -> str:
        return self.file("STOP")

    @property
    def publish(self) -> str:
        return self.file("publish")

    @property
    def pid(self) -> str:
        return self.file("agent.pid")  # the detached agent's pid (controller.hosts)

    @property
    def rc(self) -> str:
        return self.file("agent.rc")  # its exit code, once it has ended

    @property
    def out(self) -> str:
        return self.file("agent.out")  # its raw stdout/stderr (tracebacks before logging starts)


def meter(price_per_hour: float, billing_started_at: float, now: float,
          bandwidth_usd: float = 0.0) -> float:
    """Dollars spent so far: the hourly price over wall time since billing began, plus bandwidth."""
    return max(0.0, now - billing_started_at) / 3600.0 * price_per_hour + bandwidth_usd


def read_json(host: "Host", path: str, *, strict: bool = False) -> dict[str, Any] | None:
    """A JSON object file from the instance, read with a size limit (``STATUS_MAX_BYTES``).

    None when it is missing or not (yet) whole JSON (a writer that is not atomic; the next poll
    reads it whole). A file over the limit or not UTF-8 is ``UntrustedInput`` with ``strict``
    (the follow loop), else None (a one-off read on the way to a fetch or a destroy)."""
    data = host.read_bytes(path, 0, STATUS_MAX_BYTES + 1)
    if not data:
        return None
    try:
        if len(data) > STATUS_MAX_BYTES:
            raise UntrustedInput(f"{posixpath.basename(path)} from the instance is larger than "
                                 f"{STATUS_MAX_BYTES} bytes")
        text = decode(data, where=posixpath.basename(path))
    except UntrustedInput:
        if strict:
            raise
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_int(host: "Host", path: str) -> int | None:
    """A small integer file (pid, exit code); None when missing or not a number."""
    data = host.read_bytes(path, 0, 32)
    try:
        return int(data.decode("ascii").strip()) if data else None
    except (ValueError, UnicodeDecodeError):
        return None


def log_lines(chunk: bytes) -> list[str]:
    """Whole lines of a log chunk; of a progress bar redrawn with ``\r`` only its last state.
    The lines are data from the instance: undecodable bytes are replaced, terminal control
    sequences removed, each line cut at ``LOG_LINE_MAX_CHARS``."""
    lines = []
    for raw in chunk.decode("utf-8", errors="replace").split("\n")[:-1]:
        line = clean_text(raw.rstrip("\r").rsplit("\r", 1)[-1], limit=LOG_LINE_MAX_CHARS,
                          keep_newlines=False)
        if line.strip():
            lines.append(line)
    return lines


def status_values(status: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``status.json`` the controller uses, checked: numbers are finite numbers,
    text is safe for a terminal. Raises UntrustedInput naming the field."""
    where = "status.json"
    return {
        "agent_state": text_field(status.get("state"), limit=40),
        "stage": text_field(status.get("stage"), limit=80),
        "step": integer(status.get("step"), field="step", where=where),
        "total": integer(status.get("total"), field="total", where=where),
        "loss": number(status.get("loss"), field="loss", where=where),
        "s_per_step": number(status.get("s_per_step"), field="s_per_step", where=where),
        "eta_s": number(status.get("eta_s"), field="eta_s", where=where),
        "error": text_field(status.get("error")),
    }


def request_stop(host: "Host", paths: RunPaths, reason: str, *, hard: bool = False) -> None:
    """Write ``STOP`` (atomically): graceful by default, ``hard`` to stop the trainer at once.
    Any STOP stops an agent; an agent that predates the JSON form reads it as graceful."""
    request = StopRequest(HARD if hard else GRACEFUL, reason)
    host.write_bytes(paths.stop, (request.to_json() + "\n").encode("utf-8"))


def on_cap_of(run: dict[str, Any]) -> str:
    """The run's ``budget.on_cap`` from its journaled spec ("graceful_stop" when unknown)."""
    try:
        spec = json.loads(run.get("spec_json") or "{}")
    except ValueError:
        spec = {}
    budget = spec.get("budget") if isinstance(spec, dict) else None
    return str((budget or {}).get("on_cap") or "graceful_stop")


def fetched_checkpoint(journal: "Journal", run_id: str) -> dict[str, Any] | None:
    """The newest ``checkpoint_fetched`` event's detail whose local file is still there."""
    for event in reversed(journal.events(run_id, kind=CHECKPOINT_FETCHED)):
        local = event["detail"].get("local")
        if local and Path(local).is_file():
            return dict(event["detail"])
    return None


class Follower:
    """Polls one run until its agent ends. ``poll()`` is one step; ``follow()`` loops."""

    def __init__(self, host: "Host", paths: RunPaths, *, journal: "Journal", run_id: str,
                 price_per_hour: float, billing_started_at: float, budget_usd: float,
                 max_hours: float | None = None, bandwidth_usd: float = 0.0,
                 poll_interval: float = 2.0, finish_allowance_s: float = FINISH_ALLOWANCE_S,
                 lost_contact_s: float = LOST_CONTACT_S, reporter: Reporter | None = None,
                 health: Callable[[], str | None] | None = None, on_cap: str | None = None,
                 stop_grace_s: float = 300.0, checkpoint_dir: Path | None = None,
                 checkpoint_max_bytes: int | None = None,
                 transfer_cost: Callable[[Any], float] | None = None,
                 prior_usd: float = 0.0,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.host = host
        self.paths = paths
        self.journal = journal
        self.run_id = run_id
        self.price_per_hour = price_per_hour
        self.billing_started_at = billing_started_at
        self.budget_usd = budget_usd
        self.max_hours = max_hours
        self.bandwidth_usd = bandwidth_usd
        self.prior_usd = prior_usd  # the run's earlier machines (controller.run.relaunch)
        self.poll_interval = poll_interval
        self.lost_contact_s = lost_contact_s
        self.reporter = reporter or NullReporter()
        self.health = health
        self.clock = clock
        self.sleep = sleep
        run = journal.get_run(run_id) or {}
        # "hard_stop": the cap's STOP stops the trainer at once; None: the run's journaled spec
        self.hard_cap = (on_cap or on_cap_of(run)) == "hard_stop"
        self.finish_allowance_s = (min(finish_allowance_s, HARD_FINISH_ALLOWANCE_S)
                                   if self.hard_cap else finish_allowance_s)
        self.offset = int(run.get("log_offset") or 0)
        self.stage_seen = run.get("stage")  # a change is journaled (``agent_stage``)
        self.stop_requested = bool(run.get("stop_requested"))
        self.stop_grace_s = stop_grace_s
        # when the cap's STOP must have been obeyed (journaled: a reattaching controller keeps it)
        stops = journal.events(run_id, kind="cap_stop")
        self.stop_deadline: float | None = (
            float(stops[-1]["detail"]["deadline"]) if stops and
            stops[-1]["detail"].get("deadline") is not None else None)
        self._last_sample: float | None = None
        # None: checkpoints stay on the host; transfer_cost journals a download, returns its USD
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_max_bytes = checkpoint_max_bytes
        self.transfer_cost = transfer_cost
        home = fetched_checkpoint(journal, run_id) if checkpoint_dir is not None else None
        self.fetched: str | None = home["path"] if home else None  # the remote path brought home
        self.fetched_local: Path | None = Path(home["local"]) if home else None
        self._failed_noted: str | None = None  # the checkpoint whose failed download was noted
        self.seen_checkpoint: str | None = None  # the newest one a status named, home or not

    def _tail_log(self) -> list[str]:
        data = self.host.read_bytes(self.paths.log, self.offset, LOG_CHUNK_MAX_BYTES)
        if not data:
            return []
        cut = data.rfind(b"\n")
        if cut < 0 and len(data) < LOG_CHUNK_MAX_BYTES:
            return []  # half a line: wait for its end
        if cut < 0:  # one line longer than a whole chunk: show it cut, go on after it
            data, cut = data + b"\n", len(data)
        chunk = data[: cut + 1]
        self.offset += len(chunk)
        return log_lines(chunk)

    def _cap_reached(self, spend: float, now: float) -> str | None:
        ahead = self.poll_interval + self.finish_allowance_s
        if self.price_per_hour > 0 and spend + self.price_per_hour * ahead / 3600 >= self.budget_usd:
            return (f"controller cost cap: ${spend:.2f} spent, the finish would cross "
                    f"${self.budget_usd:.2f}")
        if self.max_hours and now - self.billing_started_at + ahead >= self.max_hours * 3600:
            return f"controller time cap: {self.max_hours} h"
        return None

    def _fetch_checkpoint(self, status: dict[str, Any]) -> None:
        """Bring the agent's newest checkpoint home when it is one not brought home yet.

        One download attempt per poll; a failure is noted once and tried again next poll. Only
        the file fetched before (inside ``checkpoint_dir``) is ever deleted, after a success."""
        reported = status.get("last_checkpoint")
        if self.checkpoint_dir is None or not reported or reported == self.fetched:
            return
        remote = inside_run_dir(reported, self.paths.run_dir, field="last_checkpoint",
                                where="status.json")
        target = self.checkpoint_dir / posixpath.basename(remote)
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            stats = self.host.download(remote, target, max_bytes=self.checkpoint_max_bytes)
        except (TransportError, OSError) as exc:
            if self._failed_noted != remote:
                self._failed_noted = remote
                self.reporter.note(f"could not bring checkpoint {remote} home ({exc}); "
                                   "trying again at the next poll")
            return
        if self.transfer_cost is not None:
            self.bandwidth_usd += self.transfer_cost(stats)
        step = checkpoint_step(remote)
        step = status.get("step") if step is None else step
        previous, self.fetched, self.fetched_local = self.fetched_local, reported, target
        self.journal.add_event(self.run_id, CHECKPOINT_FETCHED,
                               {"path": reported, "local": str(target), "step": step})
        self.reporter.note(f"checkpoint of step {step} is home: {target}")
        if previous is not None and previous != target \
                and previous.parent == self.checkpoint_dir and previous.is_file():
            with contextlib.suppress(OSError):  # a stale copy left behind harms nothing
                previous.unlink()

    def poll(self) -> Snapshot:
        """One round trip: status, new log lines, heartbeat, spend; may write STOP, and may bring
        a new checkpoint home (``checkpoint_dir``)."""
        now = self.clock()
        # Exit code first: when it is there, everything below was written before it.
        rc = read_int(self.host, self.paths.rc)
        pid = read_int(self.host, self.paths.pid)
        alive: bool | None = False if rc is not None else None
        if rc is None and pid is not None:
            alive = self.host.is_alive(pid)
            if not alive:
                # It may have ended between the two reads: its exit code is written before its
                # session ends, so a look now tells an ended agent from a vanished one.
                rc = read_int(self.host, self.paths.rc)
        status = read_json(self.host, self.paths.status, strict=True) or {}
        values = status_values(status)  # raises UntrustedInput: the run ends in its release path
        lines = self._tail_log()
        self.host.write_bytes(self.paths.heartbeat, f"{now:.3f}\n".encode())
        spend = self.prior_usd + meter(self.price_per_hour, self.billing_started_at, now,
                                       self.bandwidth_usd)
        if isinstance(status.get("last_checkpoint"), str) and status["last_checkpoint"]:
            self.seen_checkpoint = status["last_checkpoint"]
        snap = Snapshot(
            run_id=self.run_id, **values, spend_usd=spend,
            budget_usd=self.budget_usd, price_per_hour=self.price_per_hour,
            elapsed_s=max(0.0, now - self.billing_started_at), agent_alive=alive, agent_rc=rc,
            status=status, stop_requested=self.stop_requested,
        )
        if not self.stop_requested and not snap.finished:
            reason = self._cap_reached(spend, now)
            if reason:
                kind = HARD if self.hard_cap else GRACEFUL
                request_stop(self.host, self.paths, reason, hard=self.hard_cap)
                self.stop_requested = snap.stop_requested = True
                self.stop_deadline = now + self._grace(spend)
                self.journal.update_run(self.run_id, stop_requested=1)
                self.journal.add_event(self.run_id, "cap_stop", {
                    "reason": reason, "kind": kind, "spend_usd": spend,
                    "deadline": self.stop_deadline})
                how = "at once (on_cap: hard_stop)" if self.hard_cap else "gracefully"
                self.reporter.note(f"{reason}: asked the agent to stop {how}")
        if snap.stage and snap.stage != self.stage_seen:  # when setup ended, for the batch's
            self.stage_seen = snap.stage  # split of a machine between its runs (batch.shares)
            self.journal.add_event(self.run_id, "agent_stage", {"stage": snap.stage})
        self.journal.update_run(self.run_id, log_offset=self.offset, stage=snap.stage,
                                step=snap.step, total=snap.total, loss=snap.loss,
                                spend_usd=spend)
        if self._last_sample is None or now - self._last_sample >= SPEND_SAMPLE_S or snap.finished:
            self.journal.add_spend_sample(self.run_id, usd=spend, dph_total=self.price_per_hour,
                                          bandwidth_usd=self.bandwidth_usd)
            self._last_sample = now
        if lines:
            self.reporter.log(lines)
        if not snap.finished and snap.agent_state not in AGENT_TERMINAL:
            self._fetch_checkpoint(status)  # after the cap: a download must not delay a STOP
        self.reporter.update(snap)
        if not snap.finished and self.stop_deadline is not None and now >= self.stop_deadline:
            self.journal.add_event(self.run_id, "stop_ignored", {"spend_usd": spend})
            raise StopIgnored(f"the agent did not stop within {self.stop_grace_s:.0f} s of the "
                              f"budget cap's STOP (${spend:.2f} of ${self.budget_usd:.2f} spent)")
        return snap

    def _grace(self, spend: float) -> float:
        """How long the agent may take to obey the cap's STOP: ``stop_grace_s``, but never longer
        than what the money left buys at this price."""
        if self.price_per_hour <= 0:
            return self.stop_grace_s
        left_s = max(0.0, self.budget_usd - spend) / self.price_per_hour * 3600
        return min(self.stop_grace_s, left_s)

    def _problem(self, exc: TransportError) -> str | None:
        """Why the machine is lost: what the SSH reconnect loop already heard from its ``give_up``
        hook (the provider's health, wired by the orchestrator), else the provider, asked now."""
        if isinstance(exc, Unreachable) and exc.problem:
            return exc.problem
        return self.health() if self.health is not None else None

    def follow(self) -> Snapshot:
        """Poll until the agent has ended. A dropped connection asks the provider first (``health``:
        a machine that is gone raises ``MachineLost`` at once); otherwise it is retried until
        ``lost_contact_s`` passes without one good poll (then ``RunError``)."""
        last_ok = self.clock()
        while True:
            try:
                snap = self.poll()
            except TransportError as exc:
                problem = self._problem(exc)
                if problem:
                    self.journal.add_event(self.run_id, "machine_lost", {"problem": problem})
                    raise MachineLost(f"the machine of run {self.run_id} is lost: {problem}") \
                        from exc
                if self.clock() - last_ok > self.lost_contact_s:
                    self.journal.add_event(self.run_id, "lost_contact", {"error": str(exc)})
                    raise RunError(
                        f"lost contact with the machine of run {self.run_id} for more than "
                        f"{self.lost_contact_s:.0f} s: {exc}",
                        hint=f"the agent keeps going on its own; `flux-remote resume "
                             f"{self.run_id}` reattaches") from exc
                self.reporter.note(f"connection problem ({exc}); retrying")
                self.host.close()
                self.sleep(self.poll_interval)
                continue
            last_ok = self.clock()
            if snap.finished:
                return snap
            self.sleep(self.poll_interval)
