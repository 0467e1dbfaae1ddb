"""The agent's own spend meter: stop training before the budget or ``max_hours`` is crossed.

Spend is ``price_per_hour x hours since billing started`` (the plan's ``billing_started_at``) plus
the traffic the instance received, at the offer's ``inet_down_cost`` $/GB (Vast bills it: the pip
installs and ~33 GB of weights cost real money). The received bytes are the instance's own count:
``/proc/net/dev`` of the container's network namespace, which starts at zero with the container.
The image pull happens outside the container and is not in that count; the controller's meter
carries the planner's estimate of it. The
trainer is stopped gracefully, so the decision is taken one checkpoint ahead: when the *next*
checkpoint (projected from seconds per step and ``save_every``) plus a reserve for validating and
publishing would cross the cap, training stops now and the run packs what it has.

With ``budget.on_cap: hard_stop`` (``hard``) the trainer is stopped at once instead of after its
next save, so no checkpoint is projected: training stops when the reserve for validating and
publishing would cross the cap.

On an instance shared by several runs (:mod:`remote.seats`) ``price_per_hour`` is already the
seat's share (the controller divided it), but the received-bytes counter is the container's: it
counts every seat's downloads. The guard bills this seat ``1/seats`` of that traffic
(``inet_down_cost / seats`` per GB); nothing on the machine tells one seat's bytes from
another's. The first seat's setup downloads (ai-toolkit, weights) are shared the same way, like
the machine's price.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from remote.seats import seat_of

# Seconds kept back for validate + publish after training stops.
DEFAULT_RESERVE_S = 120.0
NET_DEV = "/proc/net/dev"


def received_bytes(path: str = NET_DEV) -> int | None:
    """Bytes received on every interface but loopback, from ``/proc/net/dev`` (the first number
    after ``iface:`` is the receive byte count; see proc(5)); None where it cannot be read."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    total = 0
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, fields = line.partition(":")
        if not sep or name.strip() == "lo":
            continue
        numbers = fields.split()
        if numbers and numbers[0].isdigit():
            total += int(numbers[0])
    return total


class ReceivedSince:
    """Bytes received since this run's agent first started on the instance.

    The first reading is kept in ``base_file`` (in the run dir), so a restarted agent goes on
    counting from the same point. A counter below that base means the container itself restarted
    (its counters start again at zero): everything it shows then counts. Counting from the
    agent's start leaves out only what the onstart script fetched (a few packages)."""

    def __init__(self, base_file: Path, read: Callable[[], int | None] = received_bytes) -> None:
        self.base_file, self.read = Path(base_file), read
        self.base: int | None = None

    def __call__(self) -> int | None:
        now = self.read()
        if now is None:
            return None
        if self.base is None:
            self.base = self._load_or_write_base(now)
        return now - self.base if now >= self.base else now

    def _load_or_write_base(self, now: int) -> int:
        try:
            return int(self.base_file.read_text().strip())
        except (OSError, ValueError):
            temp = self.base_file.with_name(self.base_file.name + ".tmp")
            temp.write_text(str(now))
            temp.replace(self.base_file)
            return now


@dataclass
class CostGuard:
    price_per_hour: float
    budget_usd: float
    max_hours: float | None
    started_at: float
    clock: Callable[[], float] = time.time
    reserve_s: float = DEFAULT_RESERVE_S
    stop_reason: str | None = None  # set once the guard has asked training to stop
    hard: bool = False  # budget.on_cap hard_stop: the trainer stops now, not after a save
    down_usd_per_gb: float = 0.0  # the offer's inet_down_cost: what received traffic costs
    rx_bytes: Callable[[], int | None] = lambda: None  # bytes the instance received (billed)

    @classmethod
    def from_plan(cls, plan: dict, *, clock: Callable[[], float] = time.time,
                  rx_bytes: Callable[[], int | None] = lambda: None) -> "CostGuard":
        instance = plan.get("instance") or {}
        seats = seat_of(plan).seats  # the traffic counter is the whole container's
        return cls(price_per_hour=float(plan.get("price_per_hour") or 0.0),
                   budget_usd=float(plan.get("budget_usd") or 0.0),
                   max_hours=plan.get("max_hours"),
                   started_at=float(plan.get("billing_started_at") or clock()), clock=clock,
                   hard=on_cap(plan) == "hard_stop",
                   down_usd_per_gb=float(instance.get("inet_down_cost") or 0.0) / seats,
                   rx_bytes=rx_bytes)

    def hours(self) -> float:
        return max(0.0, self.clock() - self.started_at) / 3600.0

    def bandwidth_usd(self) -> float:
        """What the traffic received so far cost (0 where it is free or cannot be counted)."""
        if self.down_usd_per_gb <= 0:
            return 0.0
        received = self.rx_bytes()
        return 0.0 if received is None else received / 1e9 * self.down_usd_per_gb

    def spend(self) -> float:
        return round(self.price_per_hour * self.hours() + self.bandwidth_usd(), 4)

    def _billed(self) -> bool:
        return self.budget_usd > 0 and (self.price_per_hour > 0 or self.down_usd_per_gb > 0)

    def cap_reached(self) -> bool:
        """The budget or max_hours is used up now (not projected)."""
        if self._billed() and self.spend() >= self.budget_usd:
            return True
        return self.max_hours is not None and self.hours() >= float(self.max_hours)

    def check(self, *, step: int | None, s_per_step: float | None, save_every: int | None,
              saves_ahead: int = 1, next_saves_s: tuple[float, ...] | None = None) -> str | None:
        """Why training should stop now, or None. Remembers the first reason it gave.

        ``s_per_step`` is wall time; ``next_saves_s`` (wall seconds until each of the next saves
        is complete, the samples and saves on the way counted: :mod:`remote.pace`) replaces the
        ``steps x s_per_step`` projection when it reaches ``saves_ahead`` saves."""
        reason = self._reason(step, s_per_step, save_every, max(1, saves_ahead), next_saves_s)
        if reason and not self.stop_reason:
            self.stop_reason = reason
        return reason

    def _reason(self, step: int | None, s_per_step: float | None, save_every: int | None,
                saves_ahead: int, next_saves_s: tuple[float, ...] | None = None) -> str | None:
        hours_now = self.hours()
        if self.max_hours is not None and hours_now >= float(self.max_hours):
            return f"max_hours {self.max_hours} reached ({hours_now:.2f} h)"
        spend_now = self.spend()
        if self._billed() and spend_now >= self.budget_usd:
            return f"budget ${self.budget_usd:.2f} reached (spent ${spend_now:.2f})"
        if self.hard or s_per_step is None or not save_every or step is None:
            # hard: nothing to wait for; no wall-clock rate yet (the first steps of an attempt):
            # at least validate + publish lie ahead
            ahead_s, what = self.reserve_s, "validating and publishing"
        else:
            steps_left = save_every - (step % save_every) + (saves_ahead - 1) * save_every
            if next_saves_s is not None and len(next_saves_s) >= saves_ahead:
                ahead_s = next_saves_s[saves_ahead - 1] + self.reserve_s
            else:
                ahead_s = steps_left * s_per_step + self.reserve_s
            what = f"the checkpoint at step {step + steps_left}"
        if self.max_hours is not None and hours_now + ahead_s / 3600 > float(self.max_hours):
            return f"{what} would pass max_hours {self.max_hours}"
        if self._billed():
            projected = spend_now + self.price_per_hour * ahead_s / 3600
            if projected > self.budget_usd:
                return f"{what} would cost ${projected:.2f}, over the ${self.budget_usd:.2f} budget"
        return None


def on_cap(plan: dict) -> str:
    """The plan's ``budget.on_cap``: "graceful_stop" (the default) or "hard_stop"."""
    budget = (plan.get("spec") or {}).get("budget") or {}
    return str(budget.get("on_cap") or "graceful_stop")
