"""The train stage's supervisor: run the trainer as a child, watch it, stop it gracefully, retry.

The trainer (ai-toolkit's ``run.py`` or the tiny trainer) runs in its own process group with
stdout and stderr on one pipe. Every byte goes to ``ctx.log`` (the agent's log); a
:class:`~remote.progress.LogWatcher` turns the bytes into progress and checkpoint callbacks.

Graceful stop. A checkpoint must never be cut in half, and ai-toolkit does not save on SIGTERM,
so when ``ctx.stop_requested()`` turns true the supervisor waits for a safe moment to send
SIGTERM to the group:

* ``after_next_save`` (ai-toolkit): wait for the next save to complete, then SIGTERM; the work
  since that save is the only thing lost, and nothing is lost that was saved.
* ``sigterm`` (tiny trainer, which saves on SIGTERM): SIGTERM at once unless a save is running,
  in which case right after it.

A save runs from ``Saving at step`` (or ``Saved checkpoint to`` for the final one) until
``Saved optimizer to``: ai-toolkit announces the LoRA before it writes ``optimizer.pt``
(``BaseSDTrainProcess.save``), so a SIGTERM at "Saved checkpoint to" would leave the optimizer
state of the previous save beside the new LoRA, or half an ``optimizer.pt``.

Hard stop. ``ctx.stop_now()`` turning true (``budget.on_cap: hard_stop`` when the cost guard
fires) is a stop request that does not wait for the next save: SIGTERM at once, under either
policy, unless a save is running, in which case right after it. ai-toolkit loses the steps since
its last save; the tiny trainer saves on SIGTERM anyway.

A save is also taken to be running from the last step until the final save is complete:
ai-toolkit starts its final save with no line. The last step is told by the bar reaching
``total - 1``, not ``total``: only the pinned commit's bar reaches ``total`` (27a03a91 changed
``progress_bar.update(step - n)`` to ``step + 1 - n``), and an image may hold another commit.

Either way, SIGKILL follows if the trainer has not exited ``grace_s`` after SIGTERM.

Unloadable saves. Before every start, saves that do not load (a save cut in half by SIGKILL
or a host OOM) are set aside (:func:`remote.resume.set_aside_unloadable`): ai-toolkit would
pick the newest one and crash on it at every retry.

Runs that must end. A ``Missing keys: [...]`` line that is not empty means the LoRA ai-toolkit
resumes from did not load and it would train from zero: the trainer is ended and the run fails
(cause ``missing_keys``). A phase (loading, baseline sampling, training, saving, sampling)
that prints nothing for longer than its budget (``STALL_BUDGETS``) is a stall: the trainer is
ended and the failure names the phase (cause ``stall``; retried like a crash).

Crashes. A non-zero exit that was not asked for is a crash: the cause is recognised from the log
(:func:`remote.progress.recognise_error`) and the trainer is launched again up to
``max_retries`` times (both trainers resume from the newest checkpoint by themselves), except for
causes a retry cannot fix (HF auth, import errors, a full disk).

Leftovers. While a trainer runs, ``ctx.pid_file`` (``work/trainer.pid``) holds its pid, process
group and config path; it is removed when the trainer has ended. A file that is still there names a
trainer whose agent was killed: the next agent ends that group (:mod:`remote.stages.orphans`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from remote.pace import Pace, Schedule
from remote.progress import MISSING_KEYS, NON_RETRYABLE_CAUSES, LogEvent, LogWatcher, Progress
from remote.resume import set_aside_unloadable

TAIL_LINES = 50
_TAIL_BYTES = 256 * 1024
STOP_POLICIES = ("after_next_save", "sigterm")
# Seconds a phase may print nothing. Loading covers quantizing a 12B transformer on a slow CPU
# (no bar); the baseline sampling is known to hang with no output; a Flux step on the slowest
# GPU we rent is well under a minute, a sample pass or a save a few minutes.
STALL_BUDGETS = {"loading": 3600.0, "baseline sampling": 1800.0, "training": 1200.0,
                 "sampling": 1800.0, "saving": 1200.0, "final save": 1200.0,
                 "final sampling": 1800.0}
# causes seen in a trainer's output that end the run at once (remote.progress)
ABORT_CAUSES = frozenset({MISSING_KEYS})


# Keys the trainer never needs: the per-instance Vast key (the agent's watchdog uses it) and the
# account key, should it ever be in the agent's environment. A trainer that prints its
# environment, or a third-party library that uploads it, must not see them.
TRAINER_HIDDEN_ENV = ("CONTAINER_API_KEY", "VAST_API_KEY")


def trainer_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The trainer's environment: ``extra`` over ``base``, without the Vast keys."""
    env = {k: v for k, v in {**base, **extra}.items() if k not in TRAINER_HIDDEN_ENV}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class TrainContext:
    """What the runner hands the supervisor. ``env`` is laid over the agent's own environment."""

    config_path: Path
    output_dir: Path  # training_folder/name: where the checkpoints appear
    name: str
    command: list[str]
    log: Callable[[str], None]
    env: dict[str, str]
    stop_requested: Callable[[], bool]
    on_progress: Callable[[Progress], None]
    on_checkpoint: Callable[[Path, int], None]
    max_retries: int
    total_steps: int
    cwd: Path
    stop_policy: str | None = None  # None: "sigterm" for the tiny trainer, else "after_next_save"
    grace_s: float = 120.0  # SIGTERM -> SIGKILL
    poll_s: float = 0.2  # how often stop_requested() is asked while the trainer is quiet
    clock: Callable[[], float] = time.monotonic
    # a stop that must not wait for the next save (implies stop_requested); None: never
    stop_now: Callable[[], bool] | None = None
    pid_file: Path | None = None  # holds the running trainer's pid and group; None: not recorded
    # the longest silence per phase (LogWatcher.phase) before the trainer is ended as stalled
    stall_budgets: dict[str, float] = field(default_factory=lambda: dict(STALL_BUDGETS))
    save_every: int | None = None  # the config's, for the time left (None: saves not counted)
    sample_every: int | None = None  # the config's; None or 0: sampling off

    def hard_stop(self) -> bool:
        return self.stop_now is not None and self.stop_now()

    def any_stop(self) -> bool:
        """A stop of either kind is asked for (both callbacks are polled: each may record why)."""
        requested = self.stop_requested()
        return self.hard_stop() or requested


@dataclass
class TrainResult:
    state: str  # "done" | "stopped" | "failed"
    final_lora: Path | None
    last_checkpoint: Path | None
    step: int
    error: str | None
    cause: str | None
    log_tail: list[str] = field(default_factory=list)
    s_per_step: float | None = None
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("final_lora", "last_checkpoint"):
            data[key] = str(data[key]) if data[key] else None
        return data


@dataclass
class _Attempt:
    returncode: int
    stop_asked: bool
    term_sent: bool
    watcher: LogWatcher
    tail: list[str]
    start_error: str | None = None  # the command could not be started at all: no retry
    abort: tuple[str, str] | None = None  # (cause, message): the supervisor ended a bad run


def trainer_command(spec: dict[str, Any], config_path: Path, aitk_dir: Path | None) -> list[str]:
    """The argv that trains ``config_path``: ``training.command`` (with ``{config}`` filled in)
    when the spec gives one, else the tiny trainer or ai-toolkit's ``run.py`` (to be run with
    ``cwd=aitk_dir``, using the checkout's ``venv`` or ``.venv`` when it has one)."""
    training = spec.get("training") or {}
    if training.get("command"):
        return [str(arg).replace("{config}", str(config_path)) for arg in training["command"]]
    if training.get("trainer", "ai-toolkit") == "tiny":
        return [sys.executable, "-m", "remote.trainers.tiny", str(config_path)]
    if aitk_dir is None:
        raise ValueError("the ai-toolkit trainer needs the directory of its checkout")
    python = next((str(p) for p in (aitk_dir / "venv" / "bin" / "python",
                                     aitk_dir / ".venv" / "bin" / "python") if p.exists()),
                  sys.executable)
    return [python, "run.py", str(config_path)]


def write_pid_file(path: Path, pid: int, pgid: int, config_path: Path) -> None:
    """Record a started trainer (atomically: the next agent may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "pgid": pgid, "config": str(config_path)}),
                   encoding="utf-8")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> dict[str, Any] | None:
    """The record :func:`write_pid_file` left, or None when there is none or it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"pid": int(data["pid"]), "pgid": int(data["pgid"]), "config": str(data["config"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_stop_policy(command: list[str]) -> str:
    return "sigterm" if "remote.trainers.tiny" in command else "after_next_save"


def render_tail(data: bytes, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines as a terminal shows them (each ``\\r`` redraw replaces the line)."""
    shown = []
    for segment in data.decode("utf-8", errors="replace").split("\n"):
        redraws = [piece.rstrip() for piece in segment.split("\r") if piece.strip()]
        if redraws:
            shown.append(redraws[-1])
    return shown[-lines:]


def read_lora_step(path: Path) -> int | None:
    """``training_info.step`` from a safetensors header, with the standard library only."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            header = json.loads(fh.read(size))
        return int(json.loads(header["__metadata__"]["training_info"])["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _newest_on_disk(output_dir: Path, name: str) -> Path | None:
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
    steps = sorted((int(m.group(1)), p) for p in output_dir.glob(f"{name}_*.safetensors")
                   if (m := pattern.match(p.name)))
    if steps:
        return steps[-1][1]
    final = output_dir / f"{name}.safetensors"
    return final if final.is_file() else None


class _Pipe:
    """The trainer's output: read without blocking past a timeout, teed, parsed, tail kept."""

    def __init__(self, fd: int, sup: "_Supervisor") -> None:
        self.fd, self.sup = fd, sup
        self.watcher = LogWatcher(sup.ctx.name)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.tail = bytearray()
        self.eof = False

    def pump(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; True when something was read."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return False
        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
        self.sup.tee(self.decoder.decode(chunk))
        self.sup.dispatch(self.watcher.feed(chunk))
        return True

    def finish(self) -> None:
        self.sup.tee(self.decoder.decode(b"", final=True))
        self.sup.dispatch(self.watcher.close())


class _Supervisor:
    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.policy = ctx.stop_policy or default_stop_policy(ctx.command)
        if self.policy not in STOP_POLICIES:
            raise ValueError(f"stop_policy {self.policy!r} is not one of {STOP_POLICIES}")
        self.step = 0
        self.s_per_step: float | None = None
        self.last_checkpoint: Path | None = None
        self.watcher: LogWatcher | None = None  # the running attempt's
        self.pace = self._new_pace()
        self._at_line_start = True
        self._hard = False

    def note(self, message: str) -> None:
        """A supervisor line in the trainer's log, on a line of its own."""
        self.ctx.log(("" if self._at_line_start else "\n") + f"[train] {message}\n")
        self._at_line_start = True

    def tee(self, text: str) -> None:
        if text:
            self.ctx.log(text)
            self._at_line_start = text.endswith("\n")

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.ctx.cwd / p

    def _new_pace(self) -> Pace:
        ctx = self.ctx
        return Pace(Schedule(ctx.total_steps, ctx.save_every, ctx.sample_every))

    def _paced(self, progress: Progress) -> Progress:
        """The bar's step and loss with wall-clock s/step, ETA and time to the next saves."""
        pace, every = self.pace, self.ctx.save_every
        ahead: list[float] = []
        if every and progress.total:
            target = (progress.step // every + 1) * every
            while len(ahead) < 2 and (seconds := pace.seconds_to(min(target, progress.total))) \
                    is not None:
                ahead.append(seconds)
                target += every
        return replace(progress, s_per_step=pace.s_per_step, eta_s=pace.eta_s,
                       next_saves_s=tuple(ahead) or None)

    def dispatch(self, events: list[LogEvent]) -> None:
        for event in events:
            self.pace.observe(event, self.ctx.clock())
            if event.kind == "progress" and event.progress is not None:
                self.step = max(self.step, event.progress.step)
                progress = self._paced(event.progress)
                self.s_per_step = progress.s_per_step or self.s_per_step
                self.ctx.on_progress(progress)
            elif event.kind == "checkpoint" and event.path is not None:
                path = self._resolve(event.path)
                step = event.step if event.step is not None else self.step
                self.step = max(self.step, step)
                self.last_checkpoint = path
                self.ctx.on_checkpoint(path, step)

    def attempt(self) -> _Attempt:
        ctx = self.ctx
        env = trainer_env(os.environ, ctx.env)
        try:
            proc = subprocess.Popen(ctx.command, cwd=ctx.cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            message = f"cannot start the trainer {ctx.command[0]!r}: {exc.strerror or exc}"
            self.note(message)
            return _Attempt(127, False, False, LogWatcher(), [message], start_error=message)
        if ctx.pid_file is not None:  # its own session: the group id is its pid
            write_pid_file(ctx.pid_file, proc.pid, proc.pid, ctx.config_path)
        pipe = _Pipe(proc.stdout.fileno(), self)
        self.watcher = pipe.watcher
        self.pace = self._new_pace()  # loading and baseline sampling are not steps
        saves_at_stop: int | None = None
        term_at: float | None = None
        abort: tuple[str, str] | None = None
        last_output = ctx.clock()
        try:
            while True:
                exited = proc.poll() is not None
                got_data = pipe.pump(0 if exited else ctx.poll_s)
                if exited and not got_data:  # drained (a grandchild may still hold the pipe)
                    break
                if got_data:
                    last_output = ctx.clock()
                if abort is None and term_at is None and not exited:
                    abort = self._abort_reason(pipe.watcher, last_output)
                    if abort is not None:
                        self.note(f"{abort[1]}: ending the trainer")
                        self._signal(proc, signal.SIGTERM)
                        term_at = ctx.clock()
                        continue
                if pipe.eof and not exited:
                    try:
                        proc.wait(timeout=ctx.poll_s)
                    except subprocess.TimeoutExpired:
                        pass
                if saves_at_stop is None and ctx.any_stop():
                    saves_at_stop = pipe.watcher.saves
                    self.note(f"stop requested at step {self.step}: " + self._stop_plan())
                if saves_at_stop is not None and term_at is None:
                    while pipe.pump(0):  # lines already written must count before deciding
                        pass
                    watcher = pipe.watcher
                    if not watcher.saving and not self.final_save_due() and (
                            self.policy == "sigterm" or self._now(waiting=True)
                            or watcher.saves > saves_at_stop):
                        self._signal(proc, signal.SIGTERM)
                        term_at = ctx.clock()
                elif term_at is not None and ctx.clock() - term_at > ctx.grace_s:
                    self.note(f"trainer still running {ctx.grace_s:.0f}s after SIGTERM: SIGKILL")
                    self._signal(proc, signal.SIGKILL)
                    term_at = float("inf")
        finally:
            if proc.poll() is None:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            if ctx.pid_file is not None:
                ctx.pid_file.unlink(missing_ok=True)
        pipe.finish()
        return _Attempt(proc.returncode, saves_at_stop is not None, term_at is not None,
                        pipe.watcher, render_tail(bytes(pipe.tail)), abort=abort)

    def _abort_reason(self, watcher: LogWatcher, last_output: float) -> tuple[str, str] | None:
        """Why a running trainer must be ended: a LoRA that did not load, or a silent phase."""
        if watcher.cause in ABORT_CAUSES:
            return watcher.cause, (f"ai-toolkit did not load the LoRA it resumes from "
                                   f"({watcher.error_line}); it would train from zero")
        budget = self.ctx.stall_budgets.get(watcher.phase)
        silent = self.ctx.clock() - last_output
        if budget is not None and silent > budget:
            return "stall", (f"stall: the trainer printed nothing for {silent:.0f} s during "
                             f"{watcher.phase} (budget {budget:.0f} s)")
        return None

    def final_save_due(self) -> bool:
        """In the last step or past it, until the final save is complete: a save may be running.

        ai-toolkit writes its final ``<name>.safetensors`` right after the last step without a
        ``Saving at step`` line (``BaseSDTrainProcess.run``: ``self.save()`` after the loop), so
        ``watcher.saving`` cannot see it; a SIGTERM then would cut the finished LoRA in half.
        ``total - 1``: before the pinned commit the bar never showed ``total``."""
        total = self.ctx.total_steps
        final_saved = self.watcher is not None and self.watcher.final_saved
        return bool(total) and self.step >= total - 1 and not final_saved

    def _stop_plan(self) -> str:
        if self._now(waiting=False):
            return "hard stop: stopping now (a save in progress finishes first)"
        if self.policy == "after_next_save":
            return "stopping after the next checkpoint"
        return "stopping (a save in progress finishes first)"

    def _now(self, *, waiting: bool) -> bool:
        """A hard stop is asked for (remembered; logged when it cuts short a wait for a save)."""
        if not self._hard and self.ctx.hard_stop():
            self._hard = True
            if waiting and self.policy == "after_next_save":
                self.note(f"hard stop at step {self.step}: not waiting for the next checkpoint")
        return self._hard

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def result(self, state: str, attempt: _Attempt | None, attempts: int, *,
               error: str | None = None, cause: str | None = None) -> TrainResult:
        ctx = self.ctx
        final = ctx.output_dir / f"{ctx.name}.safetensors"
        last = self.last_checkpoint if self.last_checkpoint and self.last_checkpoint.is_file() \
            else _newest_on_disk(ctx.output_dir, ctx.name)
        for path in (final if state == "done" else None, last):
            if path is not None and (step := read_lora_step(path)) is not None:
                self.step = max(self.step, step)
                break
        return TrainResult(
            state=state, final_lora=final if state == "done" else None, last_checkpoint=last,
            step=self.step, error=error,
            cause=cause or (attempt.watcher.cause if attempt else None),
            log_tail=attempt.tail if attempt else [], s_per_step=self.s_per_step, attempts=attempts)


def run_training(ctx: TrainContext) -> TrainResult:
    """Train until done, a graceful stop, or a failure that retries did not fix."""
    sup = _Supervisor(ctx)
    attempts = 0
    attempt: _Attempt | None = None
    error: str | None = None
    while True:
        if ctx.any_stop():
            sup.note("stop requested: not starting the trainer")
            return sup.result("stopped", attempt, attempts, error=error)
        attempts += 1
        aside = set_aside_unloadable(ctx.output_dir, ctx.name)
        if aside is not None:
            sup.note(f"saves that do not load (cut short by a kill?) moved to {aside}: "
                     + ", ".join(sorted(p.name for p in aside.iterdir())))
        sup.note(f"starting trainer for {ctx.total_steps} steps (attempt {attempts}/"
                 f"{ctx.max_retries + 1}): " + " ".join(ctx.command))
        attempt = sup.attempt()
        final = ctx.output_dir / f"{ctx.name}.safetensors"
        rc = attempt.returncode
        if rc == 0 and final.is_file() and attempt.abort is None:
            sup.note(f"trainer finished: {final}")
            return sup.result("done", attempt, attempts)
        if attempt.abort and attempt.abort[0] == "stall" and attempt.watcher.final_saved \
                and final.is_file():  # hung in the final samples: the LoRA is whole and saved
            sup.note(f"trainer ended after its final save: {final} (final samples may be missing)")
            return sup.result("done", attempt, attempts)
        if attempt.stop_asked and attempt.abort is None:
            error = None if attempt.term_sent else f"trainer exited with code {rc} while stopping"
            sup.note(f"trainer stopped at step {sup.step} (exit code {rc})")
            return sup.result("stopped", attempt, attempts, error=error)
        cause = attempt.abort[0] if attempt.abort else attempt.watcher.cause
        if attempt.start_error:
            return sup.result("failed", attempt, attempts, error=attempt.start_error)
        if attempt.abort:
            error = attempt.abort[1]
        elif rc == 0:
            error = f"trainer exited 0 but wrote no {final.name}"
        else:
            error = f"trainer exited with code {rc}"
            if attempt.watcher.error_line:
                error += f": {attempt.watcher.error_line}"
        if cause in NON_RETRYABLE_CAUSES or attempts > ctx.max_retries:
            why = f"{cause}: a retry cannot fix it" if cause in NON_RETRYABLE_CAUSES \
                else f"{ctx.max_retries} retries used"
            sup.note(f"trainer failed ({error}); not retrying ({why})")
            return sup.result("failed", attempt, attempts, error=error, cause=cause)
        sup.note(f"trainer crashed ({cause or 'unrecognised cause'}); retrying from "
                 f"{_newest_on_disk(ctx.output_dir, ctx.name) or 'the start'}")
