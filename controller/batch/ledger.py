"""The batch budget ledger: one total, many runs, never exceeded.

Each run of a batch holds one entry. Before it starts, its *reservation* is taken from the total:
the provider's estimate times ``1 + margin``, plus what the controller's cap holds back for the
finish (:func:`run_reservation`), capped at the run's own ``budget.max_usd`` (or that budget
when the provider cannot estimate). The run is then launched with its budget lowered to
the reservation, so the controller's meter and the agent's cost guard stop it there. While it
runs, what counts against the total is ``max(reservation, metered spend)``; when it ends, only the
spend counts and the rest of the reservation goes back to the pool.

A run whose reservation does not fit what is left is not started (``skipped: budget``).

The ledger is rebuilt from the journal (:meth:`Ledger.from_runs`): an active run's reservation is
its journaled ``budget_usd`` (the lowered budget it was launched with), an ended run's charge is
its journaled ``spend_usd``. So ``resume BATCH`` after a crash knows exactly what is committed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable

SAFETY_MARGIN = 0.15  # as the spec's budget.safety_margin: estimates are optimistic


@dataclass
class Entry:
    reserved: float
    spent: float = 0.0
    open: bool = True

    @property
    def committed(self) -> float:
        """What this run holds against the total now."""
        return max(self.reserved, self.spent) if self.open else self.spent


# What the controller's cost cap holds back for a run's finish (``controller.run.follow``
# ``FINISH_ALLOWANCE_S``: STOP is written once the spend plus that much of the machine's time
# reaches the run's budget). A reservation without it would stop a run whose estimate came true
# before its end whenever its margin is worth less than those ten minutes.
FINISH_HOLD_S = 600.0


def reservation_for(est_usd: float | None, run_budget_usd: float, *,
                    margin: float = SAFETY_MARGIN, hold_usd: float = 0.0) -> float:
    """What a run reserves: its estimate plus the margin, plus ``hold_usd`` (what the cap holds
    back for its finish), never more than its own budget; its whole budget when nothing can be
    estimated."""
    if est_usd is None:
        return float(run_budget_usd)
    return min(float(run_budget_usd), float(est_usd) * (1.0 + margin) + hold_usd)


def run_reservation(estimate: Any, spec: Any) -> float:
    """A batch run's reservation for ``estimate`` (a ``providers.base.Estimate``) under
    ``spec`` (its ``RunSpec``): its margin and :data:`FINISH_HOLD_S` of its machine's price
    on top of the estimate, capped at its budget."""
    hold = float(estimate.price_per_hour or 0.0) * FINISH_HOLD_S / 3600.0
    return reservation_for(estimate.est_usd, spec.budget.max_usd,
                           margin=spec.budget.safety_margin, hold_usd=hold)


class Ledger:
    """Thread-safe accounting of one batch's total (every method takes the lock)."""

    def __init__(self, total_usd: float, *, margin: float = SAFETY_MARGIN) -> None:
        self.total_usd = float(total_usd)
        self.margin = margin
        self._entries: dict[str, Entry] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_runs(cls, total_usd: float, runs: Iterable[dict[str, Any]], *,
                  active_states: Iterable[str], reservations: dict[str, float] | None = None,
                  margin: float = SAFETY_MARGIN) -> "Ledger":
        """The ledger as the journal's runs of a batch describe it (see the module docstring);
        ``reservations`` (journaled when each run started) default to the runs' budgets."""
        ledger = cls(total_usd, margin=margin)
        active = set(active_states)
        reservations = reservations or {}
        for run in runs:
            spent = float(run.get("spend_usd") or 0.0)
            if run["state"] in active:
                reserved = reservations.get(run["run_id"], float(run["budget_usd"]))
                ledger._entries[run["run_id"]] = Entry(float(reserved), spent, True)
            else:
                ledger._entries[run["run_id"]] = Entry(0.0, spent, False)
        return ledger

    def restore(self, key: str, reserved: float, spent: float, open_: bool) -> None:
        """An entry as the journal has it (``resume``: a pack's idle seats)."""
        with self._lock:
            self._entries[key] = Entry(float(reserved), float(spent), bool(open_))

    def open_keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.open and k.startswith(prefix)]

    def committed(self) -> float:
        with self._lock:
            return sum(entry.committed for entry in self._entries.values())

    def spent(self) -> float:
        with self._lock:
            return sum(entry.spent for entry in self._entries.values())

    def reserved(self) -> float:
        """Reserved and not yet spent, over the open entries."""
        with self._lock:
            return sum(max(0.0, e.reserved - e.spent) for e in self._entries.values() if e.open)

    def remaining(self) -> float:
        return self.total_usd - self.committed()

    def fits(self, amount: float) -> bool:
        return amount <= self.remaining() + 1e-9

    def try_reserve(self, key: str, amount: float) -> bool:
        """Reserve ``amount`` for ``key`` when it fits what is left; False (and nothing held)
        otherwise. Reserving again for an open key replaces its reservation."""
        with self._lock:
            previous = self._entries.pop(key, None)
            if amount <= self.remaining() + 1e-9:
                self._entries[key] = Entry(float(amount), previous.spent if previous else 0.0)
                return True
            if previous is not None:
                self._entries[key] = previous
            return False

    def rename(self, old: str, new: str) -> None:
        """Move an entry to another key (a reservation taken before its run had an id)."""
        with self._lock:
            if old in self._entries:
                self._entries[new] = self._entries.pop(old)

    def meter(self, key: str, spent_usd: float) -> None:
        """The run's metered spend so far (only ever grows)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.open:
                entry.spent = max(entry.spent, float(spent_usd))

    def close(self, key: str, spent_usd: float | None = None) -> float:
        """The run ended: only its spend counts now. Returns the amount released."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.open:
                return 0.0
            if spent_usd is not None:
                entry.spent = max(entry.spent, float(spent_usd))
            before = entry.committed
            entry.open = False
            return max(0.0, before - entry.committed)

    def cancel(self, key: str) -> None:
        """Drop a reservation whose run never started (nothing was spent)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.open and entry.spent == 0:
                del self._entries[key]

    def entry(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else Entry(entry.reserved, entry.spent, entry.open)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"total_usd": self.total_usd, "committed_usd": round(self.committed(), 6),
                    "spent_usd": round(self.spent(), 6), "reserved_usd": round(self.reserved(), 6),
                    "remaining_usd": round(self.remaining(), 6), "margin": self.margin,
                    "runs": {key: {"reserved_usd": e.reserved, "spent_usd": e.spent,
                                   "open": e.open} for key, e in self._entries.items()}}
