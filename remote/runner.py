"""The agent's pipeline: ``python -m remote run PLAN.json``.

Stages run in order (:data:`remote.status.STAGES`); each records its start, end and outcome in
``events.jsonl`` and ``status.json``. Re-running the same plan resumes: finished stages are
skipped (the three dataset stages run again together unless all three finished, since each needs
the previous one's in-memory result), training continues from the newest checkpoint, and a run
that already finished only reports so. One agent per run dir: an ``fcntl`` lock on
``agent.lock``.

A ``STOP`` file in the run dir, the cost guard, or the watchdog ask training to stop gracefully
(with ``budget.on_cap: hard_stop`` the cost guard and the watchdog's cap stop it at once, see
:mod:`remote.train`); the run then validates and publishes what exists and ends ``stopped``.
``training.resume_from_checkpoint`` ``none`` or a path is applied once per run before the trainer
starts (:mod:`remote.resume`); a path is validated in the checks stage already.

Exit codes: 0 done or stopped with a bundle, 1 failed (or another agent holds the run), 2 bad plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from remote.checks import Probes
from remote.costguard import CostGuard
from remote.plan import PlanError, load_plan, write_json_atomic
from remote.secrets import load_secrets, redactor_for
from remote.status import FINISHED_STATES, STAGES, AgentLog, RunRecorder, StageFailed
from remote.watchdog import Watchdog

if TYPE_CHECKING:
    from remote.resume import ResumePolicy

DATASET_STAGES = ("ingest", "caption", "quality_gate")
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
STATUS_MIN_INTERVAL_S = 0.5  # progress redraws update status.json at most this often
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


def _newest_lora(output_dir: Path, name: str) -> Path | None:
    """The final ``<name>.safetensors``, else the checkpoint with the highest step."""
    final = output_dir / f"{name}.safetensors"
    if final.is_file():
        return final
    steps = []
    for path in output_dir.glob(f"{name}_*.safetensors"):
        tail = path.stem[len(name) + 1:]
        if tail.isdigit():
            steps.append((int(tail), path))
    return max(steps)[1] if steps else None


def trainer_pids(config_path: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Processes whose command line names ``config_path``: a trainer a killed agent left behind."""
    pids = []
    for entry in proc_root.iterdir() if proc_root.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config_path).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


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
        self.env = dict(os.environ if env is None else env)
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
        self.guard = CostGuard.from_plan(plan, clock=clock)
        self.stop_reason: str | None = None
        self._hard_stop = False  # budget.on_cap hard_stop and the cap was hit: stop the trainer now
        self._stop_lock = threading.Lock()
        self._ingest_result: Any = None
        self._last_status_write = 0.0
        self._last_loss_step: int | None = None
        self._saves_ahead = 1
        self.watchdog = Watchdog(
            self.run_dir, grace_s=float(plan.get("heartbeat_grace_s") or 900), env=self.env,
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
        the trainer prints no progress, e.g. while it loads the model)."""
        if self.guard.hard and not self._hard_stop and self.guard.cap_reached():
            self.recorder.event("costguard", reason="cap reached", spend_usd=self.guard.spend(),
                                hard=True)
            self.cap_stop("cost guard: cap reached")
        return self._hard_stop

    def stop_requested(self) -> bool:
        if self.stop_reason is None and (self.run_dir / "STOP").exists():
            self.request_stop("STOP file in the run dir")
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

    def _wandb_enabled(self) -> bool:
        return bool((self.spec.get("wandb") or {}).get("enabled"))

    def _record_wandb_url(self) -> None:
        """Put the W&B run URL into status.json once it is known (the controller shows it)."""
        if (not self._wandb_enabled() or self.recorder.status.get("wandb_url")
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
        if not packed:
            self.recorder.stage("publish")["state"] = "pending"  # the bundle went missing: repack
        if not all(self.recorder.stage_done(s) for s in DATASET_STAGES):
            for stage in DATASET_STAGES:
                self.recorder.stage(stage)["state"] = "pending"
        self.watchdog.start()
        try:
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
                outcome, detail = getattr(self, f"_stage_{stage}")()
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

    # -- stages ------------------------------------------------------------------------------
    def _stage_checks(self) -> tuple[str, dict[str, Any]]:
        from remote.checks import run_checks

        report = run_checks(self.spec, self.plan, probes=self.probes)
        for check in report.checks:
            self.log.agent(f"check {check.name}: {check.status} (value {check.value}, "
                           f"threshold {check.threshold}) {check.detail}".rstrip())
            if check.status == "warn":
                self.recorder.event("warning", check=check.name, message=check.detail,
                                    value=check.value, threshold=check.threshold)
        self.recorder.event("mount_choice", **report.mount_choice)
        if report.failed:
            names = ", ".join(f"{c.name} ({c.value} vs {c.threshold}: {c.detail})"
                              for c in report.failed)
            raise StageFailed(f"runtime checks failed: {names}", cause="checks")
        self._check_resume_source()
        detail = report.to_dict()
        detail["outputs"] = self._place_outputs(report.mount_choice)
        return "done", detail

    def _place_outputs(self, choice: dict[str, Any]) -> str:
        """With a chosen volume other than the run's own, ``output/`` becomes a link onto it, so
        checkpoints land on the large disk too (the run dir keeps its layout)."""
        if self.output.exists() or self.output.is_symlink():
            return str(self.output.resolve())
        volume = choice.get("volume")
        if choice.get("origin") in (None, "remote_root") or not volume:
            return str(self.output)
        same_device = (self.probes or Probes()).same_device
        if same_device(str(volume), str(self.run_dir)):
            return str(self.output)
        target = Path(choice["chosen"]) / "outputs" / self.plan["run_id"]
        target.mkdir(parents=True, exist_ok=True)
        self.output.symlink_to(target, target_is_directory=True)
        self.log.agent(f"outputs go to {target} (the largest volume), linked as {self.output}")
        return str(target)

    def _stage_bootstrap(self) -> tuple[str, dict[str, Any]]:
        from remote.aitk_config import base_model_path
        from remote.bootstrap import IMAGE_CHECKOUTS, bootstrap

        checks = self.detail("checks")
        cache_root = Path(checks.get("cache_root") or self.run_dir.parent / "cache")
        result = bootstrap(self.spec, cache_root=cache_root,
                           env=self.trainer_env(), log=self.log.agent,
                           driver=(checks.get("gpu") or {}).get("driver"),
                           base_model=base_model_path(self.spec),
                           image_checkouts=self.image_checkouts if self.image_checkouts is not None
                           else IMAGE_CHECKOUTS)
        self.log.agent(f"bootstrap: {result.source}, hf access {result.hf_access}")
        return "done", result.to_dict()

    def _dataset_spec(self) -> dict[str, Any]:
        return self.spec.get("dataset") or {}

    def _stage_ingest(self) -> tuple[str, dict[str, Any]]:
        from remote.dataset.ingest import ingest

        dataset = self._dataset_spec()
        try:
            result = ingest(Path(self.plan["dataset_dir"]), self.work,
                            caption_ext=dataset.get("caption_ext", "txt"),
                            max_side=int(dataset.get("max_side", 2048)))
        except (OSError, ValueError) as exc:
            raise StageFailed(f"cannot ingest the dataset: {exc}", cause="dataset") from exc
        self._ingest_result = result
        totals = result.to_dict()["totals"]
        self.log.agent(f"ingest: {totals}")
        return "done", {"dataset_dir": str(result.dataset_dir),
                        "manifest": str(result.manifest_path), "totals": totals}

    def _stage_caption(self) -> tuple[str, dict[str, Any]]:
        from remote.dataset.caption import caption

        captioning = self.spec.get("captioning") or {}
        try:
            report = caption(self._ingest_result, mode=captioning.get("mode", "template"),
                             template=captioning.get("template", "a photo of [trigger]"),
                             trigger=self.spec.get("trigger_word"),
                             caption_ext=self._dataset_spec().get("caption_ext", "txt"),
                             model=captioning.get("model"),
                             insert_trigger=captioning.get("insert_trigger", True),
                             batch_size=int(captioning.get("batch_size", 8)))
        except (OSError, ValueError, ImportError) as exc:
            raise StageFailed(f"captioning failed: {exc}", cause="caption") from exc
        full = report.to_dict()
        write_json_atomic(self.work / "caption_report.json", full)
        summary = {k: v for k, v in full.items() if k != "entries"}
        self.recorder.event("captions", **summary)
        return "done", summary

    def _stage_quality_gate(self) -> tuple[str, dict[str, Any]]:
        from remote.dataset.quality import run_gate, write_report

        caption_ext = self._dataset_spec().get("caption_ext", "txt")
        try:
            report = run_gate(self._ingest_result, self.spec.get("quality_gate") or {},
                              caption_ext=caption_ext)
        except ValueError as exc:
            raise StageFailed(f"bad quality_gate settings: {exc}", cause="quality_gate") from exc
        write_report(report, self.work / "quality_report.json")
        self._write_excluded(report.to_dict())
        summary = report.summary()
        self.log.agent(summary)
        self.recorder.event("quality_gate", passed=report.passed, reasons=report.reasons,
                            warnings=report.warnings, usable=len(report.usable),
                            excluded=report.excluded)
        if not report.passed:
            raise StageFailed(summary, cause="quality_gate")
        return "done", {"passed": True, "usable": len(report.usable),
                        "excluded": len(report.excluded), "warnings": report.warnings,
                        "report": str(self.work / "quality_report.json")}

    def _write_excluded(self, gate: dict[str, Any]) -> None:
        """Thumbnails of the excluded originals, for report.html (made now, while they exist)."""
        from remote.publish.report_html import thumbnail_data_uri

        source_root = Path(self.plan["dataset_dir"])
        items = [{"source": entry["source"], "categories": entry.get("categories"),
                  "details": entry.get("details"),
                  "thumb": thumbnail_data_uri(source_root / entry["source"], size=160)}
                 for entry in gate.get("images") or [] if entry.get("excluded")]
        write_json_atomic(self.work / "excluded.json", items)

    def _stage_config(self) -> tuple[str, dict[str, Any]]:
        from remote.aitk_config import build_aitk_config, dump_yaml

        has_gpu = bool((self.detail("checks").get("gpu") or {}).get("devices"))
        config = build_aitk_config(self.spec, dataset_dir=self.detail("ingest")["dataset_dir"],
                                   training_folder=str(self.output),
                                   device="cuda:0" if has_gpu else "cpu")
        path = self.work / "config.yaml"
        tmp = path.with_name(".config.yaml.tmp")
        tmp.write_text(dump_yaml(config), encoding="utf-8")
        os.replace(tmp, path)
        process = config["config"]["process"][0]
        return "done", {"config_path": str(path), "steps": process["train"]["steps"],
                        "save_every": process["save"]["save_every"],
                        "rank": process["network"]["linear"],
                        "prompts": process.get("sample", {}).get("prompts", [])}

    def _stage_train(self) -> tuple[str, dict[str, Any]]:
        from remote.train import TrainContext, default_stop_policy, run_training, trainer_command

        config = self.detail("config")
        config_path = Path(config["config_path"])
        aitk_dir = self.detail("bootstrap").get("aitk_dir")
        command = trainer_command(self.spec, config_path, Path(aitk_dir) if aitk_dir else None)
        # a trainer that saves on SIGTERM stops at once; ai-toolkit only after its next save
        self._saves_ahead = 1 if default_stop_policy(command) == "sigterm" else 2
        self._reap_orphans(config_path)
        self._apply_resume(int(config["steps"]))
        self.recorder.update(total=config["steps"])
        self.recorder.event("train_start", command=[Path(a).name if i == 0 else a
                                                    for i, a in enumerate(command)])
        context = TrainContext(
            config_path=config_path, output_dir=self.output / self.name, name=self.name,
            command=command, log=self.log.trainer, env=self.trainer_env(),
            stop_requested=self.stop_requested, on_progress=self._on_progress,
            on_checkpoint=self._on_checkpoint,
            max_retries=int((self.spec.get("training") or {}).get("max_retries", 1)),
            total_steps=int(config["steps"]), cwd=Path(aitk_dir) if aitk_dir else self.run_dir,
            stop_now=self.stop_now)
        result = run_training(context)
        self.log.flush()
        self._record_wandb_url()
        detail = {"state": result.state, "step": result.step, "s_per_step": result.s_per_step,
                  "final_lora": str(result.final_lora) if result.final_lora else None,
                  "last_checkpoint": (str(result.last_checkpoint) if result.last_checkpoint
                                      else None),
                  "stop_reason": self.stop_reason}
        self.recorder.update(step=result.step, spend_usd=self.guard.spend())
        if result.state == "failed":
            self.recorder.event("train_failed", error=result.error, cause=result.cause,
                                log_tail=result.log_tail)
            tail = "\n".join(result.log_tail[-50:])
            raise StageFailed(f"training failed ({result.cause or 'unknown cause'}): "
                              f"{result.error}\n{tail}", cause=result.cause or "trainer")
        if result.state == "stopped" and result.last_checkpoint is None:  # a hard stop, early
            raise StageFailed(f"training stopped at step {result.step} ({self.stop_reason}) "
                              "before its first checkpoint: nothing to publish", cause="stopped")
        return ("stopped" if result.state == "stopped" else "done"), detail

    def _resume_policy(self) -> "ResumePolicy":
        from remote.resume import ResumePolicy, run_rank, setting_of

        rank = self.detail("config").get("rank") or run_rank(self.spec)
        return ResumePolicy(setting_of(self.spec), run_dir=self.run_dir,
                            run_id=self.plan["run_id"], dataset_dir=Path(self.plan["dataset_dir"]),
                            output_dir=self.output / self.name, name=self.name, rank=int(rank),
                            clock=self.clock)

    def _check_resume_source(self) -> None:
        """A resume_from_checkpoint LoRA that cannot be used fails before the bootstrap is paid."""
        from remote.resume import ResumeError

        try:
            source = self._resume_policy().check()
        except ResumeError as exc:
            raise StageFailed(str(exc), cause="resume") from exc
        if source is not None:
            self.log.agent(f"resume_from_checkpoint: {source.path} is usable (step {source.step}, "
                           f"{source.pairs} LoRA pairs)")

    def _apply_resume(self, total: int) -> None:
        """``none`` or a path, once per run: set earlier files aside, place the LoRA to start at."""
        from remote.resume import ResumeError

        try:
            record = self._resume_policy().apply()
        except ResumeError as exc:
            raise StageFailed(str(exc), cause="resume") from exc
        if record is None:
            return
        self.recorder.event("resume", **record)
        if record["set_aside"]:
            self.log.agent(f"resume_from_checkpoint {record['setting']}: moved "
                           f"{len(record['moved'])} earlier file(s) to {record['set_aside']} "
                           "(nothing deleted)")
        if record["checkpoint"]:
            self.log.agent(f"resume_from_checkpoint: training starts from {record['source']} at "
                           f"step {record['step']} (optimizer state fresh)")
            if record["step"] >= total:
                self.warn(f"the resume checkpoint is at step {record['step']}, the run has {total}"
                          " steps: training only saves it as the final LoRA")
        else:
            self.log.agent("resume_from_checkpoint none: training starts at step 0")

    def _reap_orphans(self, config_path: Path, *, wait_s: float = 30.0) -> None:
        """A trainer left by a killed agent must not train next to the new one.

        Its output pipe is gone, so it dies at its next write; give it ``wait_s`` to do so (it may
        be in the middle of a save), then SIGTERM, then SIGKILL.
        """
        pids = trainer_pids(config_path)
        if not pids:
            return
        self.recorder.event("orphan_trainer", pids=pids)
        self.log.agent(f"a previous trainer is still running (pid {pids}); waiting for it to end")
        for sig, patience in ((None, wait_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            living = [pid for pid in pids if _alive(pid)]
            if not living:
                return
            for pid in living if sig else []:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline and any(_alive(pid) for pid in living):
                time.sleep(0.2)

    def _on_progress(self, progress: Any) -> None:
        now = self.clock()
        if progress.loss is not None and progress.step != self._last_loss_step:
            self._last_loss_step = progress.step
            with open(self.work / "loss.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": progress.step, "loss": progress.loss,
                                     "lr": progress.lr, "t": now}) + "\n")
        reason = self.guard.check(step=progress.step, s_per_step=progress.s_per_step,
                                  save_every=self.detail("config").get("save_every"),
                                  saves_ahead=self._saves_ahead)
        # a hard cap also cuts short a graceful stop (STOP file) that is still waiting for a save
        if reason and not self._hard_stop and (self.stop_reason is None or self.guard.hard):
            self.recorder.event("costguard", reason=reason, spend_usd=self.guard.spend(),
                                step=progress.step, hard=self.guard.hard)
            self.cap_stop(f"cost guard: {reason}")
        due = now - self._last_status_write >= STATUS_MIN_INTERVAL_S
        if due or progress.step >= progress.total:
            self._last_status_write = now
            self.recorder.update(step=progress.step, total=progress.total, loss=progress.loss,
                                 lr=progress.lr, s_per_step=progress.s_per_step,
                                 eta_s=progress.eta_s, spend_usd=self.guard.spend())

    def _on_checkpoint(self, path: Path, step: int) -> None:
        self.recorder.update(last_checkpoint=str(path), step=step, spend_usd=self.guard.spend())
        self._record_wandb_url()
        self.recorder.event("checkpoint", path=str(path), step=step, spend_usd=self.guard.spend())

    def _lora_path(self) -> Path | None:
        train = self.detail("train")
        for key in ("final_lora", "last_checkpoint"):
            if train.get(key) and Path(train[key]).is_file():
                return Path(train[key])
        return _newest_lora(self.output / self.name, self.name)

    def _stage_validate(self) -> tuple[str, dict[str, Any]]:
        from remote.validate import validate_lora, validate_samples

        lora = self._lora_path()
        if lora is None:
            raise StageFailed(f"training left no LoRA file in {self.output / self.name}",
                              cause="validate")
        lora_report = validate_lora(lora, rank=self.detail("config").get("rank"))
        sampling = ((self.spec.get("training") or {}).get("sample") or {}).get("enabled", True)
        samples = validate_samples(self.output / self.name / "samples", expected=sampling)
        for problem in samples["problems"]:
            self.warn(f"samples: {problem}")
        detail = {"ok": lora_report["ok"], "lora": lora_report,
                  "samples": {k: v for k, v in samples.items() if k != "files"}}
        self.recorder.event("validation", ok=lora_report["ok"], problems=lora_report["problems"],
                            samples=samples["count"])
        if not lora_report["ok"]:
            raise StageFailed(f"{lora.name} failed validation: "
                              + "; ".join(lora_report["problems"][:10]), cause="validate")
        return "done", detail

    def _stage_publish(self) -> tuple[str, dict[str, Any]]:
        from remote.publish.bundle import pack_run

        lora = self._lora_path()
        if lora is None:
            raise StageFailed("nothing to publish: no LoRA file", cause="publish")
        config = self.detail("config")
        state = "stopped" if self.recorder.stage("train")["state"] == "stopped" else "done"
        dataset_dir = self.detail("ingest").get("dataset_dir")
        files = pack_run(
            plan=self.plan, status=self.recorder.status, lora=lora,
            config_path=Path(config["config_path"]),
            dataset_dir=Path(dataset_dir) if dataset_dir else None,
            prompts=config.get("prompts") or [], hardware=self.detail("checks").get("gpu") or {},
            train=self.detail("train"), validation=self.detail("validate"),
            spend_usd=self.guard.spend(), hours=self.guard.hours(), state=state,
            ended_at=self.clock())
        self.recorder.event("published", files=len(files), state=state)
        if self._wandb_enabled():  # the receipt exists only now: add it to the W&B run's summary
            from remote.wandb_log import summarize_run

            summarize_run(python=self.detail("bootstrap").get("python") or sys.executable,
                          output_dir=self.output / self.name, env=self.trainer_env(),
                          files=[self.run_dir / "publish" / "receipt.json",
                                 self.work / "quality_report.json"], log=self.log.agent)
        return "done", {"files": len(files), "publish_dir": str(self.run_dir / "publish")}


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
