"""The agent's own spend meter: stop training before the budget or ``max_hours`` is crossed.

Spend is ``price_per_hour x hours since billing started`` (the plan's ``billing_started_at``). The
trainer is stopped gracefully, so the decision is taken one checkpoint ahead: when the *next*
checkpoint (projected from seconds per step and ``save_every``) plus a reserve for validating and
publishing would cross the cap, training stops now and the run packs what it has.

With ``budget.on_cap: hard_stop`` (``hard``) the trainer is stopped at once instead of after its
next save, so no checkpoint is projected: training stops when the reserve for validating and
publishing would cross the cap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

# Seconds kept back for validate + publish after training stops.
DEFAULT_RESERVE_S = 120.0


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

    @classmethod
    def from_plan(cls, plan: dict, *, clock: Callable[[], float] = time.time) -> "CostGuard":
        return cls(price_per_hour=float(plan.get("price_per_hour") or 0.0),
                   budget_usd=float(plan.get("budget_usd") or 0.0),
                   max_hours=plan.get("max_hours"),
                   started_at=float(plan.get("billing_started_at") or clock()), clock=clock,
                   hard=on_cap(plan) == "hard_stop")

    def hours(self) -> float:
        return max(0.0, self.clock() - self.started_at) / 3600.0

    def spend(self) -> float:
        return round(self.price_per_hour * self.hours(), 4)

    def cap_reached(self) -> bool:
        """The budget or max_hours is used up now (not projected)."""
        if self.budget_usd > 0 and self.price_per_hour > 0 and self.spend() >= self.budget_usd:
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
        if self.price_per_hour > 0 and self.budget_usd > 0 and spend_now >= self.budget_usd:
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
        if self.price_per_hour > 0 and self.budget_usd > 0:
            projected = spend_now + self.price_per_hour * ahead_s / 3600
            if projected > self.budget_usd:
                return f"{what} would cost ${projected:.2f}, over the ${self.budget_usd:.2f} budget"
        return None


def on_cap(plan: dict) -> str:
    """The plan's ``budget.on_cap``: "graceful_stop" (the default) or "hard_stop"."""
    budget = (plan.get("spec") or {}).get("budget") or {}
    return str(budget.get("on_cap") or "graceful_stop")
