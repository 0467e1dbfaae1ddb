"""Wall-clock s/step, ETA and the cost guard's projection, on the ai-toolkit stand-in's log.

ai-toolkit's bar pauses its clock while sampling and saving (toolkit/progress_bar.py), so its
rate and remaining time are too optimistic; the stand-in's bar always claims 2.00 s/it, so any
figure taken from the bar shows here."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote.costguard import CostGuard
from remote.pace import Pace, Schedule
from remote.progress import LogEvent, LogWatcher, Progress, parse_progress
from remote.train import run_training
from tests.aitk_standin import SCRIPT, write_config
from tests.test_train_supervision import Recorder, fake_ctx

STEPS, SAVE_EVERY, SAMPLE_EVERY, PROMPTS = 40, 10, 10, 2
STEP_S, SAVE_S, BAR_S = 1.0, 30.0, 2.0  # the synthetic clock: a step, a save, a sampling redraw


def standin_log(tmp_path: Path, **env: str) -> bytes:
    config = write_config(tmp_path / "job.yaml", name="fake", training_folder=tmp_path / "out",
                          steps=STEPS, save_every=SAVE_EVERY, sample_every=SAMPLE_EVERY,
                          prompts=PROMPTS)
    done = subprocess.run([sys.executable, str(SCRIPT), str(config)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env={**os.environ, "AITK_STANDIN_DELAY": "0",
                                                         **env}, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    return done.stdout  # one pipe, as the supervisor reads it


def replay(log: bytes) -> tuple[list[tuple[float, Any, float | None]], Pace]:
    """The log's events on a clock where a step takes STEP_S, a save SAVE_S, a sample redraw
    BAR_S; returns (time, progress, pace's ETA then) per training redraw, and the pace."""
    watcher, pace = LogWatcher("fake"), Pace(Schedule(STEPS, SAVE_EVERY, SAMPLE_EVERY))
    now, last_step, seen = 0.0, None, []
    for event in watcher.feed(log) + watcher.close():
        # a step's work ends where its loss is shown (set_postfix_str redraws at the old count),
        # before that step's save and samples; the bar's update to the new count follows them
        if event.kind == "progress" and event.progress.step == last_step:
            now += STEP_S
        elif event.kind == "saved":
            now += SAVE_S
        pace.observe(event, now)
        if event.kind == "bar" and watcher.progress is not None:
            now += BAR_S  # the redraw starts a stretch of sampling
        if event.kind == "progress":
            last_step = event.progress.step
            seen.append((now, event.progress, pace.eta_s))
    return seen, pace


def test_a_log_of_other_bars_reports_no_step(tmp_path: Path) -> None:
    """Loading, quantizing, caching and the baseline samples (with their inner denoise bars)
    come before the first training redraw: none of them is a training step."""
    log = standin_log(tmp_path).decode()
    before_training = log[:log.index("lr: ")]
    before_training = before_training[:before_training.rindex("\r")]
    assert "Generating Images" in before_training and "Loading checkpoint shards" in before_training
    assert parse_progress(before_training) is None
    watcher = LogWatcher("fake")
    events = watcher.feed(log.encode()) + watcher.close()
    totals = {e.progress.total for e in events if e.kind == "progress"}
    assert totals == {STEPS}  # never a sampling bar's 2 or 4
    assert max(e.progress.step for e in events if e.kind == "progress") == STEPS


def test_phases_follow_the_trainer(tmp_path: Path) -> None:
    log = standin_log(tmp_path).replace(b"\r", b"\n")
    watcher, phases = LogWatcher("fake"), []
    for line in log.split(b"\n"):
        watcher.feed(line + b"\n")
        if not phases or phases[-1] != watcher.phase:
            phases.append(watcher.phase)
    assert phases[:3] == ["loading", "baseline sampling", "training"]
    assert "saving" in phases and "sampling" in phases
    assert phases[-2:] == ["final save", "final sampling"]


def test_s_per_step_and_eta_use_wall_time_with_the_pauses_to_come(tmp_path: Path) -> None:
    seen, pace = replay(standin_log(tmp_path))
    first_t, first, _ = seen[0]
    last_t, last, _ = seen[-1]
    assert last.s_per_step == 2.0 and last.eta_s == 10.0  # what the bar claims
    assert pace.s_per_step == pytest.approx((last_t - first_t) / (last.step - first.step))
    assert pace.s_per_step > STEP_S  # the saves and samples on the way are paid for
    # a sample pass: a redraw per prompt and denoise step, and the last one
    assert pace.save_s == SAVE_S and pace.sample_s == pytest.approx(BAR_S * (PROMPTS * 5 + 1))
    # at step 15: the steps left, the saves at 20 and 30 and the final one, the sample passes
    # at 20 and 30 and the final one
    _, at15, eta15 = next(entry for entry in seen if entry[1].step == 15)
    assert eta15 == pytest.approx((STEPS - 15) * STEP_S + 3 * SAVE_S + 3 * pace.sample_s)
    assert at15.eta_s == 10.0  # the bar's


def test_seconds_to_the_next_save_counts_the_save() -> None:
    pace = Pace(Schedule(100, save_every=20, sample_every=10))
    pace.save_s, pace.sample_s = 30.0, 12.0
    for t, step in ((0.0, 1), (0.1, 2), (2.1, 4)):  # the first interval is no step's work
        pace.observe(LogEvent("progress", "", progress=Progress(step=step, total=100)), t)
    assert pace.seconds_to(20) == pytest.approx(16 * 1.0 + 30.0 + 12.0)  # the sample at 10
    assert pace.eta_s == pytest.approx(96 + 5 * 30.0 + 10 * 12.0)  # saves 20..80 + final


def test_the_supervisor_reports_wall_time_not_the_bar(tmp_path: Path) -> None:
    ticks = itertools.count()
    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_DELAY": "0"}, steps=STEPS,
                   save_every=SAVE_EVERY, sample_every=SAMPLE_EVERY, prompts=PROMPTS,
                   clock=lambda: float(next(ticks)))
    result = run_training(ctx)
    assert result.state == "done", result.log_tail
    last = rec.progress[-1]
    assert last.s_per_step is not None and last.s_per_step != 2.0  # not the bar's paused clock
    assert result.s_per_step == last.s_per_step
    assert last.eta_s is not None and rec.progress[0].s_per_step is None  # one step: no rate yet
    with_saves = [p for p in rec.progress if p.next_saves_s]
    assert with_saves and all(len(p.next_saves_s) <= 2 for p in with_saves)


def test_the_cost_guard_projects_the_next_save_with_its_pauses() -> None:
    guard = CostGuard(price_per_hour=36.0, budget_usd=5.0, max_hours=None, started_at=0.0,
                      clock=lambda: 400.0, reserve_s=0.0)  # $4.00 spent, $1 = 100 s left
    # 40 steps of 1 s to the next save: fine by steps x s/step alone...
    assert guard.check(step=10, s_per_step=1.0, save_every=50) is None
    # ...but a sample pass and the save itself on the way take it past the budget
    reason = guard.check(step=10, s_per_step=1.0, save_every=50, next_saves_s=(130.0,))
    assert reason is not None and "over the $5.00 budget" in reason
    # before the wall clock has a rate (an attempt's first steps) the finish still counts
    late = CostGuard(price_per_hour=36.0, budget_usd=5.0, max_hours=None, started_at=0.0,
                     clock=lambda: 490.0, reserve_s=120.0)
    assert "validating and publishing would cost" in late.check(step=1, s_per_step=None,
                                                                save_every=50)
