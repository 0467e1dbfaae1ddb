"""The live board of a batch: what its runs report, for the live view.

Each run's orchestrator gets a :class:`SlotReporter`; everything it reports lands on the
batch's :class:`BatchBoard` (thread-safe: the runs are driven in threads), which the view reads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from controller.run.follow import Snapshot


class BatchBoard:
    """What the runs report, for the live view: the newest snapshot and notes per run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snaps: dict[str, Snapshot] = {}
        self.notes: list[tuple[str, str]] = []

    def reporter(self, run_id: str, name: str) -> "SlotReporter":
        return SlotReporter(self, run_id, name)

    def put(self, snap: Snapshot) -> None:
        with self._lock:
            self.snaps[snap.run_id] = snap

    def note(self, name: str, text: str) -> None:
        with self._lock:
            self.notes.append((name, text))

    def take_notes(self) -> list[tuple[str, str]]:
        with self._lock:
            notes, self.notes = self.notes, []
            return notes

    def snap(self, run_id: str | None) -> Snapshot | None:
        with self._lock:
            return self.snaps.get(run_id) if run_id else None


@dataclass
class SlotReporter:
    """One run's orchestrator reporter: everything goes to the board (log lines are dropped:
    each run's log is fetched into its out dir)."""

    board: BatchBoard
    run_id: str
    name: str

    def note(self, text: str) -> None:
        self.board.note(self.name, text)

    def update(self, snap: Snapshot) -> None:
        self.board.put(snap)

    def log(self, lines: list[str]) -> None:
        return None

