"""Seconds per step and time left, on the wall clock, with the pauses still to come.

ai-toolkit's bar cannot be trusted for either: ``ToolkitProgressBar.pause``/``unpause``
(``toolkit/progress_bar.py``) moves the bar's start time forward by every pause, so its rate and
remaining time leave out sampling and saving, which on Flux take minutes each. The instance is
paid for by the wall clock, so the agent measures on it:

* ``s_per_step``: wall seconds per step since the first training step of this attempt, pauses
  included (what a step really costs);
* ``eta_s``: the steps left at the pure step time, plus every save and sample pass still to
  come (step saves, the final save, the final samples) at their measured durations.

Standard library only; the clock is whoever calls :meth:`Pace.observe` (tests pass their own).
"""

from __future__ import annotations

from dataclasses import dataclass

from remote.progress import LogEvent


@dataclass
class Schedule:
    """When the trainer pauses: ai-toolkit saves when ``step % save_every == 0`` and samples when
    ``step % sample_every == 0`` (not at the session's first step), then saves and samples once
    more after the last step (``BaseSDTrainProcess.run``)."""

    total: int
    save_every: int | None = None
    sample_every: int | None = None  # None or 0: sampling is off

    def saves_between(self, step: int, target: int) -> int:
        """Step saves in ``(step, target)``, plus the final one when ``target`` is the end."""
        n = _multiples(step, min(target, self.total), self.save_every)
        return n + (1 if target >= self.total else 0)

    def samples_between(self, step: int, target: int) -> int:
        n = _multiples(step, min(target, self.total), self.sample_every)
        return n + (1 if target >= self.total and self.sample_every else 0)


def _multiples(after: int, before: int, every: int | None) -> int:
    """Multiples of ``every`` in the open interval ``(after, before)``."""
    if not every or before <= after + 1:
        return 0
    return (before - 1) // every - after // every


class Pace:
    """Feed it the watcher's events with the time they were read; ask it for s/step and ETA."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._first: tuple[float, int] | None = None  # (time, step) of the first training step
        self._last: tuple[float, int] | None = None
        self._pause_started: float | None = None
        self._pause_kind: str | None = None
        self._paused = 0.0  # pauses since the last step
        self._step_s: float | None = None  # wall time of one step, pauses left out
        self.save_s: float | None = None  # the last measured save
        self.sample_s: float | None = None  # the last measured sample pass

    def observe(self, event: LogEvent, now: float) -> None:
        """One event of :class:`~remote.progress.LogWatcher`, read at ``now``."""
        if event.kind == "bar":
            self.other_bar(now)
        elif event.kind in ("saving", "checkpoint") and self._pause_started is None:
            self._pause(now, "save")
        elif event.kind == "saved" and self._pause_kind == "save":
            self.save_s = self._end_pause(now)
        elif event.kind == "progress" and event.progress is not None:
            self._step(now, event.progress.step)

    def other_bar(self, now: float) -> None:
        """A bar that is not training, after training started: a sample pass is under way."""
        if self._last is not None and self._pause_started is None:
            self._pause(now, "sample")

    def _pause(self, now: float, kind: str) -> None:
        self._pause_started, self._pause_kind = now, kind

    def _end_pause(self, now: float) -> float:
        """End the pause under way; returns its length (also added to this step's pauses)."""
        length = now - self._pause_started if self._pause_started is not None else 0.0
        self._paused += length
        self._pause_started = self._pause_kind = None
        return length

    def _step(self, now: float, step: int) -> None:
        if self._pause_kind == "sample":
            self.sample_s = self._end_pause(now)
        else:
            self._end_pause(now)
        paused, self._paused = self._paused, 0.0
        if self._first is None:
            self._first = self._last = (now, step)
            return
        assert self._last is not None
        last_t, last_step = self._last
        if step > last_step:
            # the interval from the first redraw is not a step's work: ai-toolkit draws the
            # first loss after the session's first step and the update to the next count at once
            if self._last != self._first:
                per = max(now - last_t - paused, 0.0) / (step - last_step)
                self._step_s = per if self._step_s is None else 0.7 * per + 0.3 * self._step_s
            self._last = (now, step)

    @property
    def s_per_step(self) -> float | None:
        """Wall seconds per step over this attempt, pauses included; None before two steps."""
        if self._first is None or self._last is None or self._last[1] <= self._first[1]:
            return None
        return (self._last[0] - self._first[0]) / (self._last[1] - self._first[1])

    def seconds_to(self, target: int, *, now: float | None = None) -> float | None:
        """Wall seconds from the last step seen until ``target`` is reached and its save (if it
        is a save step or the end) is complete, counting the saves and samples in between."""
        if self._last is None or self._step_s is None:
            return None
        step = self._last[1]
        sched = self.schedule
        saves = sched.saves_between(step, target) + (
            1 if sched.save_every and target < sched.total and target % sched.save_every == 0
            else 0)
        samples = sched.samples_between(step, target)
        seconds = max(target - step, 0) * self._step_s
        seconds += saves * (self.save_s or 0.0) + samples * (self.sample_s or 0.0)
        if now is not None and self._pause_started is None:
            seconds = max(seconds - (now - self._last[0]), 0.0)
        return seconds

    @property
    def eta_s(self) -> float | None:
        """Until the end of training: the final save and final samples included."""
        return self.seconds_to(self.schedule.total)
