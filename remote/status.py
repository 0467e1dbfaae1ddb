"""``status.json`` and ``events.jsonl``: what the agent tells the controller.

``status.json`` is replaced atomically on every change (the controller reads it at any moment);
``events.jsonl`` is append-only, one JSON object per line with ``t`` (epoch seconds) and
``event``. Times in both are epoch seconds. ``agent.log`` (:class:`AgentLog`) holds every line
the agent and its trainer print, redacted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from remote.plan import write_json_atomic

STAGES = ("checks", "bootstrap", "ingest", "caption", "quality_gate", "config", "train",
          "validate", "publish")
RUN_STATES = ("running", "done", "failed", "stopped")
FINISHED_STATES = ("done", "stopped")


class StageFailed(Exception):
    """A stage could not do its job; ``str(exc)`` is the message a person reads."""

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def blank_status(run_id: str, budget_usd: float) -> dict[str, Any]:
    return {
        "run_id": run_id, "state": "running", "stage": None,
        "stages": {name: {"state": "pending", "started_at": None, "ended_at": None, "detail": None}
                   for name in STAGES},
        "step": None, "total": None, "loss": None, "lr": None, "s_per_step": None, "eta_s": None,
        "spend_usd": 0.0, "budget_usd": budget_usd, "last_checkpoint": None, "error": None,
        "cause": None, "pid": None, "updated_at": None,
    }


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunRecorder:
    """Owns status.json and events.jsonl for one agent process (thread-safe)."""

    def __init__(self, run_dir: Path, run_id: str, budget_usd: float, *,
                 clock: Callable[[], float] = time.time,
                 redact: Callable[[str], str] = lambda text: text) -> None:
        self.run_dir = run_dir
        self.clock = clock
        self.redact = redact
        self._lock = threading.Lock()
        status = read_status(run_dir)
        if not status or status.get("run_id") != run_id:
            status = blank_status(run_id, budget_usd)
        for name in STAGES:  # a plan from an older agent may lack a stage
            status["stages"].setdefault(
                name, {"state": "pending", "started_at": None, "ended_at": None, "detail": None})
        self.status = status

    # -- status.json -------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        if isinstance(fields.get("error"), str):
            fields["error"] = self.redact(fields["error"])
        with self._lock:
            self.status.update(fields)
            self._write()

    def _write(self) -> None:
        self.status["updated_at"] = self.clock()
        write_json_atomic(self.run_dir / "status.json", self.status)

    def stage(self, name: str) -> dict[str, Any]:
        return self.status["stages"][name]

    def stage_done(self, name: str) -> bool:
        return self.stage(name)["state"] == "done"

    # Events are appended before status.json is rewritten: a reader who sees a fact in the status
    # (a stage ended, a checkpoint saved) always finds its event, even if the agent dies between.
    def start_stage(self, name: str) -> None:
        self.event("stage_start", stage=name)
        with self._lock:
            entry = self.status["stages"][name]
            entry.update(state="running", started_at=self.clock(), ended_at=None)
            self.status["stage"] = name
            self._write()

    def end_stage(self, name: str, outcome: str, detail: Any = None) -> None:
        """``outcome``: done | failed | stopped | skipped."""
        if detail is not None:
            detail = json.loads(self.redact(json.dumps(detail, default=str)))
        self.event("stage_end", stage=name, outcome=outcome, detail=detail)
        with self._lock:
            entry = self.status["stages"][name]
            entry.update(state=outcome, ended_at=self.clock(), detail=detail)
            self._write()

    # -- events.jsonl ------------------------------------------------------------------------
    def event(self, kind: str, **data: Any) -> None:
        with self._lock:
            append_event(self.run_dir, kind, clock=self.clock, redact=self.redact, **data)


def append_event(run_dir: Path, kind: str, *, clock: Callable[[], float] = time.time,
                 redact: Callable[[str], str] = lambda text: text, **data: Any) -> None:
    """Append one event line to ``events.jsonl`` (one ``write`` call: lines never interleave)."""
    line = redact(json.dumps({"t": clock(), "event": kind, **data}, default=str)) + "\n"
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line)


class AgentLog:
    """``agent.log``: append-only, every line redacted; echoed to a terminal when there is one.

    Trainer output arrives in arbitrary chunks; it is written up to its last line break (``\n``
    or a tqdm ``\r``) so that a secret split across two chunks is still redacted whole.
    """

    MAX_PENDING = 8192

    def __init__(self, path: Path, redact: Callable[[str], str],
                 clock: Callable[[], float] = time.time) -> None:
        self._fh = open(path, "a", encoding="utf-8", buffering=1)
        self._redact = redact
        self._clock = clock
        self._lock = threading.Lock()
        self._echo = sys.stdout.isatty()
        self._pending = ""
        self._at_line_start = True

    def agent(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime(self._clock()))
        lines = "".join(f"[agent {stamp}] {line}\n" for line in str(message).splitlines() or [""])
        with self._lock:
            self._write(("" if self._at_line_start else "\n") + lines)

    def trainer(self, text: str) -> None:
        with self._lock:
            data = self._pending + text
            cut = max(data.rfind("\n"), data.rfind("\r")) + 1
            if len(data) - cut > self.MAX_PENDING:
                cut = len(data)
            self._pending = data[cut:]
            if cut:
                self._write(data[:cut])

    def _write(self, text: str) -> None:
        text = self._redact(text)
        self._fh.write(text)
        self._at_line_start = text.endswith(("\n", "\r"))
        if self._echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    def flush(self) -> None:
        """Write a held trainer tail (the trainer has exited)."""
        with self._lock:
            if self._pending:
                self._write(self._pending + "\n")
                self._pending = ""

    def close(self) -> None:
        self.flush()
        self._fh.close()


def read_events(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / "events.jsonl"
    events = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return events


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_status(status: dict[str, Any]) -> str:
    lines = [f"run {status.get('run_id')}: {status.get('state')}"
             + (f" (stage {status['stage']})" if status.get("stage") else "")]
    if status.get("total"):
        loss = status.get("loss")
        lines.append(
            f"step {status.get('step') or 0}/{status['total']}"
            + (f"  loss {loss:.4g}" if isinstance(loss, (int, float)) else "")
            + (f"  {status['s_per_step']:.2f} s/step" if status.get("s_per_step") else "")
            + f"  eta {_fmt_duration(status.get('eta_s'))}")
    spend, budget = status.get("spend_usd") or 0, status.get("budget_usd") or 0
    lines.append(f"spend ${spend:.2f} of ${budget:.2f}")
    for name, entry in status.get("stages", {}).items():
        took = None
        if entry.get("started_at") and entry.get("ended_at"):
            took = entry["ended_at"] - entry["started_at"]
        lines.append(f"  {name:<13} {entry.get('state', '?'):<8} {_fmt_duration(took)}")
    if status.get("last_checkpoint"):
        lines.append(f"last checkpoint: {status['last_checkpoint']}")
    if status.get("error"):
        lines.append(f"error: {status['error']}" + (f" (cause: {status['cause']})"
                                                     if status.get("cause") else ""))
    return "\n".join(lines)


def print_status(run_dir: str | os.PathLike[str], *, as_json: bool) -> int:
    """``python -m remote status RUN_DIR``: 0 when a status exists, 1 when it does not."""
    status = read_status(run_dir)
    if status is None:
        print(f"no status.json in {run_dir}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(format_status(status) + "\n")
    return 0
