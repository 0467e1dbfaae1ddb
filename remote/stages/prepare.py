"""The ``checks`` and ``bootstrap`` stages: is this machine fit, and is the trainer installed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote.checks import Probes
from remote.stages.training import check_resume_source
from remote.status import StageFailed

if TYPE_CHECKING:
    from remote.runner import Runner


def checks(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.checks import run_checks

    report = run_checks(run.spec, run.plan, probes=run.probes)
    for check in report.checks:
        run.log.agent(f"check {check.name}: {check.status}{check_numbers(check)} "
                      f"{check.detail}".rstrip())
        if check.status == "warn":
            run.recorder.event("warning", check=check.name, message=check.detail,
                               value=check.value, threshold=check.threshold)
    run.recorder.event("mount_choice", **report.mount_choice)
    if run.plan.get("provider") == "vast" and not run.watchdog.can_stop_instance:
        # Without CONTAINER_ID/CONTAINER_API_KEY nothing stops this instance if the laptop goes
        # away: refuse to train rather than bill silently (remote.watchdog.instance_env).
        env_file = (run.plan.get("instance") or {}).get("env_file") or "(none in the plan)"
        raise StageFailed("self-stop is impossible: CONTAINER_ID / CONTAINER_API_KEY are not in "
                          f"the environment, in {env_file} (written by the onstart script) or "
                          "in PID 1's environment", cause="checks")
    if report.failed:
        names = ", ".join(f"{c.name}{check_numbers(c)}: {c.detail}".rstrip(": ")
                          for c in report.failed)
        raise StageFailed(f"runtime checks failed: {names}", cause="checks")
    check_resume_source(run)
    detail = report.to_dict()
    detail["outputs"] = place_outputs(run, report.mount_choice)
    return "done", detail


def check_numbers(check: Any) -> str:
    """`` (3.11.7, limit 3.10)`` for a log line: the measured value and the limit it was held
    to, each only when there is one (a person reads no ``None``)."""
    parts = [str(value) for value in (check.value,) if value is not None]
    if check.threshold is not None:
        parts.append(f"limit {check.threshold}")
    return f" ({', '.join(parts)})" if parts else ""


def place_outputs(run: "Runner", choice: dict[str, Any]) -> str:
    """With a chosen volume other than the run's own, ``output/`` becomes a link onto it, so
    checkpoints land on the large disk too (the run dir keeps its layout)."""
    if run.output.exists() or run.output.is_symlink():
        return str(run.output.resolve())
    volume = choice.get("volume")
    if choice.get("origin") in (None, "remote_root") or not volume:
        return str(run.output)
    same_device = (run.probes or Probes()).same_device
    if same_device(str(volume), str(run.run_dir)):
        return str(run.output)
    target = Path(choice["chosen"]) / "outputs" / run.plan["run_id"]
    target.mkdir(parents=True, exist_ok=True)
    run.output.symlink_to(target, target_is_directory=True)
    run.log.agent(f"outputs go to {target} (the largest volume), linked as {run.output}")
    return str(target)


def bootstrap(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.aitk_config import base_model_path
    from remote.bootstrap import IMAGE_CHECKOUTS
    from remote.bootstrap import bootstrap as install

    detail = run.detail("checks")
    cache_root = Path(detail.get("cache_root") or run.run_dir.parent / "cache")
    result = install(run.spec, cache_root=cache_root,
                     env=run.trainer_env(), log=run.log.agent,
                     driver=(detail.get("gpu") or {}).get("driver"),
                     cuda=(detail.get("gpu") or {}).get("cuda"),
                     base_model=base_model_path(run.spec),
                     image_checkouts=run.image_checkouts if run.image_checkouts is not None
                     else IMAGE_CHECKOUTS)
    run.log.agent(f"bootstrap: {result.source}, hf access {result.hf_access}")
    if result.pin_mismatch:
        run.warn(result.pin_mismatch)
    return "done", result.to_dict()
