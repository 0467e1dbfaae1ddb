"""The agent's pipeline: ``python -m remote run PLAN.json``.

Stages run in order (:data:`remote.status.STAGES`); each records its start, end and outcome in
``events.jsonl`` and ``status.json``. Re-running the same plan resumes: finished stages are
skipped (the three dataset stages run again together unless all three finished, since each needs
the previous one's in-memory result), training continues from the newest checkpoint, and a run
that already finished only reports so. One agent per run dir: an ``fcntl`` lock on
``agent.lock``.

A ``STOP`` file in the run dir, the cost guard, or the watchdog ask training to stop gracefully
(with ``budget.on_cap: hard_stop`` the cost guard and the watchdog's cap stop it at once, see
:mod:`remote.train`, and so does a ``STOP`` of kind hard, see :mod:`remote.stop_request`); the
run then validates and publishes what exists and ends ``stopped``.
``training.resume_from_checkpoint`` ``none`` or a path is applied once per run before the trainer
starts (:mod:`remote.resume`); a path is validated in the checks stage already.

The stage bodies live in :mod:`remote.stages` (one module per concern); this module drives them.
A trainer left behind by a killed agent is ended when the next agent starts
(:mod:`remote.stages.orphans`). On an instance shared by several runs (the plan's
``instance.seat`` / ``seats``) the agent pins itself and its children to its own GPU before
anything else (:mod:`remote.seats`) and journals a ``gpu_seat`` event.

Exit codes: 0 done or stopped with a bundle, 1 failed (or another agent holds the run), 2 bad plan.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from remote.checks import Probes
from remote.costguard import CostGuard, ReceivedSince
from remote.plan import PlanError, load_plan
from remote.seats import pin_gpu, seat_of
from remote.secrets import load_secrets, redactor_for
from remote.stages import dataset, finish, prepare, training
from remote.stages.orphans import trainer_pids
from remote.stages.training import STATUS_MIN_INTERVAL_S
from remote.status import FINISHED_STATES, STAGES, AgentLog, RunRecorder, StageFailed
from remote.stop_request import read_stop
from remote.watchdog import Watchdog, instance_env

__all__ = ["EXIT_BAD_PLAN", "EXIT_DONE", "EXIT_FAILED", "STAGE_BODIES", "STATUS_MIN_INTERVAL_S",
           "RunLock", "Runner", "hand_over_watch", "run_plan", "trainer_pids"]

DATASET_STAGES = ("ingest", "caption", "quality_gate")
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
StageBody = Callable[["Runner"], "tuple[str, dict[str, Any]]"]
STAGE_BODIES: dict[str, StageBody] = {  # what each of remote.status.STAGES runs
    "checks": prepare.checks, "bootstrap": prepare.bootstrap,
    "ingest": dataset.ingest, "caption": dataset.caption, "quality_gate": dataset.quality_gate,
    "config": training.config, "train": training.train,
    "validate": finish.validate, "publish": finish.publish,
}
EXIT_DONE, EXIT_FAILED, EXIT_BAD_PLAN = 0, 1, 2


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run_dir>/agent.lock`` (released when the process dies)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "agent.lock"
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock; returns None, or the pid of the agent that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            return int(holder) if holder.isdigit() else -1
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Runner:
    """One agent run of one plan. Construct, then :meth:`run`."""

    def __init__(self, plan: dict[str, Any], *, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time, probes: Probes | None = None,
                 image_checkouts: tuple[str, ...] | None = None) -> None:
        self.plan = plan
        self.spec: dict[str, Any] = plan["spec"]
        self.name: str = plan["name"]
        self.run_dir = Path(plan["run_dir"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.work = self.run_dir / "work"
        self.output = self.run_dir / "output"
        # on a shared machine: this run's GPU only, before any child starts (remote.seats)
        self.seat = seat_of(plan)
        if env is None:
            pin_gpu(self.seat, os.environ)
        self.env = dict(os.environ if env is None else env)
        pin_gpu(self.seat, self.env)
        self.clock = clock
        self.probes = probes
        self.image_checkouts = image_checkouts
        self.secrets, secret_warnings = load_secrets(plan.get("secrets_file"))
        redact = redactor_for(self.secrets, self.env)
        self.log = AgentLog(self.run_dir / "agent.log", redact, clock)
        self.recorder = RunRecorder(self.run_dir, plan["run_id"],
                                    float(plan.get("budget_usd") or 0), clock=clock, redact=redact)
        for warning in secret_warnings:
            self.warn(warning)
        self.guard = CostGuard.from_plan(plan, clock=clock,
                                         rx_bytes=ReceivedSince(self.run_dir / "rx_base"))
        self.stop_reason: str | None = None
        self._hard_stop = False  # budget.on_cap hard_stop and the cap was hit: stop the trainer now
        self._stop_lock = threading.Lock()
        self.ingest_result: Any = None  # ingest's result, for caption and quality_gate
        self.watchdog = Watchdog(
            self.run_dir, grace_s=float(plan.get("heartbeat_grace_s") or 900),
            env=instance_env(plan, self.env),
            event=self.recorder.event, is_finished=self._finished,
            cap_reached=self.guard.cap_reached, stop_training=self.cap_stop, clock=clock)

    # -- small helpers -----------------------------------------------------------------------
    def warn(self, message: str) -> None:
        self.log.agent(f"warning: {message}")
        self.recorder.event("warning", message=message)

    def detail(self, stage: str) -> dict[str, Any]:
        return self.recorder.stage(stage).get("detail") or {}

    def request_stop(self, reason: str) -> None:
        with self._stop_lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.log.agent(f"stop requested: {reason}")
                self.recorder.event("stop_requested", reason=reason)

    def cap_stop(self, reason: str) -> None:
        """The budget or max_hours stops training: gracefully, or at once with ``hard_stop``."""
        if self.guard.hard:
            self._hard_stop = True
        self.request_stop(reason)

    def stop_now(self) -> bool:
        """For the supervisor: True once a hard stop is due (the cap reached counts even while
        the trainer prints no progress, e.g. while it loads the model; a hard STOP counts too)."""
        self.stop_requested()
        if self.guard.hard and not self._hard_stop and self.guard.cap_reached():
            self.recorder.event("costguard", reason="cap reached", spend_usd=self.guard.spend(),
                                hard=True)
            self.cap_stop("cost guard: cap reached")
        return self._hard_stop

    @property
    def hard_stopped(self) -> bool:
        """A hard stop was decided (``budget.on_cap: hard_stop``)."""
        return self._hard_stop

    def stop_requested(self) -> bool:
        # STOP (remote.stop_request) is re-read until a hard stop: one may follow a graceful one
        stop = None if self._hard_stop else read_stop(self.run_dir)
        if stop is not None and (stop.hard or self.stop_reason is None):
            if stop.hard and self.stop_reason is not None:
                self.log.agent(f"hard stop requested: {stop.reason}")
            self._hard_stop = stop.hard  # kind hard (the controller's cap): stop_now turns true
            self.request_stop(f"hard stop: {stop.reason}" if stop.hard else stop.reason)
        return self.stop_reason is not None

    def _finished(self) -> bool:
        return self.recorder.status.get("state") in ("done", "stopped", "failed")

    def trainer_env(self) -> dict[str, str]:
        env = {**self.env, **self.secrets, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_PARENT, self.env.get("PYTHONPATH")) if p)
        cache_root = self.detail("checks").get("cache_root")
        if cache_root and "HF_HOME" not in self.env:
            env["HF_HOME"] = str(Path(cache_root) / "hf")
        from remote.wandb_log import trainer_env as wandb_env

        env.update(wandb_env(self.spec, self.plan["run_id"], self.output, env))
        return env

    def wandb_enabled(self) -> bool:
        return bool((self.spec.get("wandb") or {}).get("enabled"))

    def record_wandb_url(self) -> None:
        """Put the W&B run URL into status.json once it is known (the controller shows it)."""
        if (not self.wandb_enabled() or self.recorder.status.get("wandb_url")
                or self.trainer_env().get("WANDB_MODE") in ("offline", "disabled", "dryrun")):
            return  # offline runs have no URL
        from remote.wandb_log import find_run_url

        url = find_run_url(self.output / self.name, self.run_dir / "agent.log")
        if url:
            self.recorder.update(wandb_url=url)

    # -- the pipeline ------------------------------------------------------------------------
    def run(self) -> int:
        status = self.recorder.status
        packed = (self.run_dir / "publish" / "SHA256SUMS").is_file()
        if status.get("state") in FINISHED_STATES and packed:
            self.log.agent(f"run {self.plan['run_id']} is already {status['state']}; nothing to do")
            self.recorder.event("already_finished", state=status["state"])
            return EXIT_DONE
        resumed = any(entry["state"] == "done" for entry in status["stages"].values())
        self.recorder.update(state="running", pid=os.getpid(), error=None, cause=None)
        self.recorder.event("agent_start", pid=os.getpid(), resumed=resumed)
        self.log.agent(("resuming" if resumed else "starting") + f" run {self.plan['run_id']}")
        if self.seat.shared:
            self.recorder.event("gpu_seat", seat=self.seat.seat, seats=self.seat.seats,
                                cuda_visible_devices=self.env.get("CUDA_VISIBLE_DEVICES"))
            self.log.agent(f"GPU {self.seat.seat} of this machine is this run's "
                           f"({self.seat.seats} runs share it)")
        if not packed:
            self.recorder.stage("publish")["state"] = "pending"  # the bundle went missing: repack
        if not all(self.recorder.stage_done(s) for s in DATASET_STAGES):
            for stage in DATASET_STAGES:
                self.recorder.stage(stage)["state"] = "pending"
        self.watchdog.start()
        try:
            if not self.recorder.stage_done("train"):  # a trainer a killed agent left running
                config_path = self.detail("config").get("config_path")
                training.reap_orphans(self, Path(config_path) if config_path else None)
            return self._run_stages()
        finally:
            self.watchdog.halt()

    def _run_stages(self) -> int:
        final_state = "done"
        for stage in STAGES:
            if self.recorder.stage_done(stage):
                self.log.agent(f"stage {stage}: already done, skipped")
                continue
            if stage == "train" and self.recorder.stage("train")["state"] == "stopped":
                final_state = "stopped"
                continue
            if self.stop_requested() and stage in STAGES[:STAGES.index("train") + 1]:
                self.recorder.end_stage(stage, "skipped", {"reason": self.stop_reason})
                if stage == "train":
                    return self._fail("train", "stopped before training began: nothing to publish",
                                      cause="stopped", state="stopped")
                continue
            self.recorder.start_stage(stage)
            self.log.agent(f"stage {stage}: started")
            begun = self.clock()
            try:
                outcome, detail = STAGE_BODIES[stage](self)
            except StageFailed as exc:
                return self._fail(stage, str(exc), cause=exc.cause)
            except Exception as exc:  # a bug: keep the traceback in agent.log, fail the run
                self.log.agent(traceback.format_exc())
                return self._fail(stage, f"internal error in stage {stage}: {exc!r}",
                                  cause="internal")
            if outcome == "stopped":
                final_state = "stopped"
            self.recorder.end_stage(stage, outcome, detail)
            self.log.agent(f"stage {stage}: {outcome} in {self.clock() - begun:.1f} s")
        self.recorder.update(state=final_state, stage=None, spend_usd=self.guard.spend())
        self.recorder.event("run_end", state=final_state)
        self.log.agent(f"run {final_state}; bundle in {self.run_dir / 'publish'}")
        return EXIT_DONE

    def _fail(self, stage: str, message: str, *, cause: str | None, state: str = "failed") -> int:
        self.log.agent(f"stage {stage} failed: {message}")
        if self.recorder.stage(stage)["state"] == "running":
            self.recorder.end_stage(stage, "failed", {"error": message, "cause": cause})
        self.recorder.update(state=state, error=message, cause=cause, spend_usd=self.guard.spend())
        self.recorder.event("run_end", state=state, error=message, cause=cause)
        return EXIT_FAILED

def _plan_problem(plan: dict[str, Any]) -> str | None:
    spec = plan.get("spec")
    if not isinstance(spec, dict) or not spec.get("name"):
        return "plan.spec is not a run spec"
    if not os.path.isabs(str(plan["run_dir"])):
        return f"run_dir {plan['run_dir']} is not an absolute path"
    return None


def run_plan(plan_path: str) -> int:
    """Run or resume the plan; 0 done/stopped with a bundle, 1 failed, 2 bad plan."""
    try:
        plan = load_plan(plan_path)
    except PlanError as exc:
        print(f"bad plan: {exc}", file=sys.stderr)
        return EXIT_BAD_PLAN
    problem = _plan_problem(plan)
    if problem:
        print(f"bad plan: {plan_path}: {problem}", file=sys.stderr)
        return EXIT_BAD_PLAN
    pin_gpu(seat_of(plan), os.environ)  # first: nothing may see the other runs' GPUs
    run_dir = Path(plan["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    holder = lock.acquire()
    if holder is not None:
        print(f"another agent (pid {holder}) is already running {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    runner = Runner(plan)
    try:
        code = runner.run()
    finally:
        lock.release()
    if runner.watchdog.can_stop_instance:
        hand_over_watch(runner, plan_path)
    runner.log.close()
    return code


def hand_over_watch(runner: Runner, plan_path: str) -> None:
    """On Vast: a detached watcher stops the instance if the laptop stays silent after the run.

    The agent itself exits now, because the controller takes its exit as the signal to fetch.
    """
    env = {**runner.env, "PYTHONPATH": os.pathsep.join(
        p for p in (PACKAGE_PARENT, runner.env.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "remote.watchdog", str(plan_path)],
                            cwd=PACKAGE_PARENT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runner.recorder.event("watchdog", action="hand_over", pid=proc.pid)
    runner.log.agent(f"watchdog handed to pid {proc.pid}: it stops this instance if the "
                     f"controller stays silent for {runner.watchdog.grace_s:.0f} s")
