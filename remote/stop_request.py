"""The ``STOP`` file in the run dir: who asks the agent to stop, and how.

The controller writes it (``flux-remote stop``, Ctrl-C then stop, the controller's cost cap); a
user may also ``touch`` it by hand. What it holds:

* nothing, or plain text: a graceful stop (checkpoint, publish what exists, end); the text is the
  reason. This is the original contract and stays valid.
* a JSON object ``{"kind": "hard" | "graceful", "reason": "..."}``: ``kind: hard`` (the
  controller's cap with ``budget.on_cap: hard_stop``) stops the trainer at once, through the same
  ``stop_now`` path as the agent's own cost guard. Any other ``kind`` is graceful: a stop that is
  not understood must never lose more work than the plain request would.

The controller writes the file atomically (``Host.write_bytes``), so it is read whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

STOP_FILE = "STOP"
HARD, GRACEFUL = "hard", "graceful"
DEFAULT_REASON = "STOP file in the run dir"
MAX_REASON = 300  # characters of the reason kept for the log and events


@dataclass(frozen=True)
class StopRequest:
    """One reading of ``STOP``: its kind (``hard`` or ``graceful``) and why it was written."""

    kind: str = GRACEFUL
    reason: str = DEFAULT_REASON

    @property
    def hard(self) -> bool:
        return self.kind == HARD

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "reason": self.reason})


def parse_stop(data: bytes | str) -> StopRequest:
    """What a ``STOP`` file's content asks for (never raises: anything odd is a graceful stop)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    if not text:
        return StopRequest()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        first = text.splitlines()[0].strip()
        return StopRequest(GRACEFUL, first[:MAX_REASON] or DEFAULT_REASON)
    kind = HARD if value.get("kind") == HARD else GRACEFUL
    reason = str(value.get("reason") or "").strip()[:MAX_REASON] or DEFAULT_REASON
    return StopRequest(kind, reason)


def read_stop(run_dir: Path) -> StopRequest | None:
    """The stop asked for in ``run_dir/STOP``, or None when there is no such file."""
    try:
        data = (Path(run_dir) / STOP_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:  # there but unreadable (a directory, permissions): still a stop request
        return StopRequest()
    return parse_stop(data)
