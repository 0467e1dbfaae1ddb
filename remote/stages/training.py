"""The ``config`` and ``train`` stages: write ai-toolkit's config, then supervise the trainer.

The train stage wires the run into the supervisor (:mod:`remote.train`): progress goes to
``status.json`` and ``work/loss.jsonl``, every progress line asks the cost guard whether the
next save still fits the cap, and ``training.resume_from_checkpoint`` is applied once per run
before the trainer starts (:mod:`remote.resume`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote.stages.orphans import PID_FILE, end_leftover, find_leftover
from remote.status import StageFailed

if TYPE_CHECKING:
    from remote.resume import ResumePolicy
    from remote.runner import Runner

STATUS_MIN_INTERVAL_S = 0.5  # progress redraws update status.json at most this often


def config(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.aitk_config import build_aitk_config, dump_yaml

    has_gpu = bool((run.detail("checks").get("gpu") or {}).get("devices"))
    built = build_aitk_config(run.spec, dataset_dir=run.detail("ingest")["dataset_dir"],
                              training_folder=str(run.output),
                              device="cuda:0" if has_gpu else "cpu")
    path = run.work / "config.yaml"
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(dump_yaml(built), encoding="utf-8")
    os.replace(tmp, path)
    process = built["config"]["process"][0]
    return "done", {"config_path": str(path), "steps": process["train"]["steps"],
                    "save_every": process["save"]["save_every"],
                    "rank": process["network"]["linear"],
                    "sample_every": (None if process.get("train", {}).get("disable_sampling")
                                     else process.get("sample", {}).get("sample_every")),
                    "prompts": process.get("sample", {}).get("prompts", [])}


class TrainingMonitor:
    """The supervisor's callbacks: progress to status and loss.jsonl, the cost guard, saves."""

    def __init__(self, run: "Runner", *, saves_ahead: int) -> None:
        self.run = run
        self.saves_ahead = saves_ahead  # saves a graceful stop may still wait for
        self._last_status_write = 0.0
        self._last_loss_step: int | None = None

    def on_progress(self, progress: Any) -> None:
        run = self.run
        now = run.clock()
        if progress.loss is not None and progress.step != self._last_loss_step:
            self._last_loss_step = progress.step
            with open(run.work / "loss.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": progress.step, "loss": progress.loss,
                                     "lr": progress.lr, "t": now}) + "\n")
        reason = run.guard.check(step=progress.step, s_per_step=progress.s_per_step,
                                 save_every=run.detail("config").get("save_every"),
                                 saves_ahead=self.saves_ahead,
                                 next_saves_s=progress.next_saves_s)
        # a hard cap also cuts short a graceful stop (STOP file) that is still waiting for a save
        if reason and not run.hard_stopped and (run.stop_reason is None or run.guard.hard):
            run.recorder.event("costguard", reason=reason, spend_usd=run.guard.spend(),
                               step=progress.step, hard=run.guard.hard)
            run.cap_stop(f"cost guard: {reason}")
        due = now - self._last_status_write >= STATUS_MIN_INTERVAL_S
        if due or progress.step >= progress.total:
            self._last_status_write = now
            run.recorder.update(step=progress.step, total=progress.total, loss=progress.loss,
                                lr=progress.lr, s_per_step=progress.s_per_step,
                                eta_s=progress.eta_s, spend_usd=run.guard.spend())

    def on_checkpoint(self, path: Path, step: int) -> None:
        run = self.run
        # the event first: whoever reads a checkpoint in status.json finds it in events.jsonl too
        run.recorder.event("checkpoint", path=str(path), step=step, spend_usd=run.guard.spend())
        run.recorder.update(last_checkpoint=str(path), step=step, spend_usd=run.guard.spend())
        run.record_wandb_url()


def train(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.train import TrainContext, default_stop_policy, run_training, trainer_command

    settings = run.detail("config")
    config_path = Path(settings["config_path"])
    aitk_dir = run.detail("bootstrap").get("aitk_dir")
    command = trainer_command(run.spec, config_path, Path(aitk_dir) if aitk_dir else None)
    # a trainer that saves on SIGTERM stops at once; ai-toolkit only after its next save
    monitor = TrainingMonitor(run, saves_ahead=1 if default_stop_policy(command) == "sigterm"
                              else 2)
    apply_resume(run, int(settings["steps"]))
    run.recorder.update(total=settings["steps"])
    run.recorder.event("train_start", command=[Path(a).name if i == 0 else a
                                               for i, a in enumerate(command)])
    context = TrainContext(
        config_path=config_path, output_dir=run.output / run.name, name=run.name,
        command=command, log=run.log.trainer, env=run.trainer_env(),
        stop_requested=run.stop_requested, on_progress=monitor.on_progress,
        on_checkpoint=monitor.on_checkpoint,
        max_retries=int((run.spec.get("training") or {}).get("max_retries", 1)),
        total_steps=int(settings["steps"]), cwd=Path(aitk_dir) if aitk_dir else run.run_dir,
        stop_now=run.stop_now, pid_file=run.work / PID_FILE,
        save_every=settings.get("save_every"), sample_every=settings.get("sample_every"))
    result = run_training(context)
    run.log.flush()
    run.record_wandb_url()
    detail = {"state": result.state, "step": result.step, "s_per_step": result.s_per_step,
              "final_lora": str(result.final_lora) if result.final_lora else None,
              "last_checkpoint": (str(result.last_checkpoint) if result.last_checkpoint
                                  else None),
              "stop_reason": run.stop_reason}
    run.recorder.update(step=result.step, spend_usd=run.guard.spend())
    if result.state == "failed":
        run.recorder.event("train_failed", error=result.error, cause=result.cause,
                           log_tail=result.log_tail)
        tail = "\n".join(result.log_tail[-50:])
        raise StageFailed(f"training failed ({result.cause or 'unknown cause'}): "
                          f"{result.error}\n{tail}", cause=result.cause or "trainer")
    if result.state == "stopped" and result.last_checkpoint is None:  # a hard stop, early
        raise StageFailed(f"training stopped at step {result.step} ({run.stop_reason}) "
                          "before its first checkpoint: nothing to publish", cause="stopped")
    return ("stopped" if result.state == "stopped" else "done"), detail


def reap_orphans(run: "Runner", config_path: Path | None, *, wait_s: float = 30.0) -> None:
    """A trainer left by a killed agent must not train next to the new one: end it (see
    :mod:`remote.stages.orphans`), via ``work/trainer.pid`` or, without one, a scan of /proc for
    ``config_path`` (None: the config stage has not run, so no trainer can have started).
    The runner calls this when an agent starts on a run whose training has not finished."""
    pid_file = run.work / PID_FILE
    leftover = find_leftover(pid_file, config_path)
    if leftover is None:
        pid_file.unlink(missing_ok=True)  # stale: that trainer is gone (or its pid reused)
        return
    run.recorder.event("orphan_trainer", pids=leftover.pids, pgid=leftover.pgid,
                       found_by=leftover.source)
    pids = ", ".join(map(str, leftover.pids))
    run.log.agent(f"a previous trainer is still running (pid {pids}); "
                  "waiting for it to end")
    end_leftover(leftover, wait_s=wait_s)
    pid_file.unlink(missing_ok=True)


def resume_policy(run: "Runner") -> "ResumePolicy":
    from remote.resume import ResumePolicy, run_rank, setting_of

    rank = run.detail("config").get("rank") or run_rank(run.spec)
    training = run.spec.get("training") or {}
    aitk = training.get("trainer", "ai-toolkit") == "ai-toolkit" and not training.get("command")
    return ResumePolicy(setting_of(run.spec), run_dir=run.run_dir,
                        run_id=run.plan["run_id"], dataset_dir=Path(run.plan["dataset_dir"]),
                        output_dir=run.output / run.name, name=run.name, rank=int(rank),
                        clock=run.clock, flux_keys=aitk)


def check_resume_source(run: "Runner") -> None:
    """A resume_from_checkpoint LoRA that cannot be used fails before the bootstrap is paid."""
    from remote.resume import ResumeError

    try:
        source = resume_policy(run).check()
    except ResumeError as exc:
        raise StageFailed(str(exc), cause="resume") from exc
    if source is not None:
        run.log.agent(f"resume_from_checkpoint: {source.path} is usable (step {source.step}, "
                      f"{source.pairs} LoRA pairs)")


def apply_resume(run: "Runner", total: int) -> None:
    """``none`` or a path, once per run: set earlier files aside, place the LoRA to start at."""
    from remote.resume import ResumeError

    try:
        record = resume_policy(run).apply()
    except ResumeError as exc:
        raise StageFailed(str(exc), cause="resume") from exc
    if record is None:
        return
    run.recorder.event("resume", **record)
    if record["set_aside"]:
        run.log.agent(f"resume_from_checkpoint {record['setting']}: moved "
                      f"{len(record['moved'])} earlier file(s) to {record['set_aside']} "
                      "(nothing deleted)")
    if record["checkpoint"]:
        run.log.agent(f"resume_from_checkpoint: training starts from {record['source']} at "
                      f"step {record['step']} (optimizer state fresh)")
        if record["step"] >= total:
            run.warn(f"the resume checkpoint is at step {record['step']}, the run has {total}"
                     " steps: training only saves it as the final LoRA")
    else:
        run.log.agent("resume_from_checkpoint none: training starts at step 0")
