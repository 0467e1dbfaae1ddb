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
        run.log.agent(f"check {check.name}: {check.status} (value {check.value}, "
                      f"threshold {check.threshold}) {check.detail}".rstrip())
        if check.status == "warn":
            run.recorder.event("warning", check=check.name, message=check.detail,
                               value=check.value, threshold=check.threshold)
    run.recorder.event("mount_choice", **report.mount_choice)
    if report.failed:
        names = ", ".join(f"{c.name} ({c.value} vs {c.threshold}: {c.detail})"
                          for c in report.failed)
        raise StageFailed(f"runtime checks failed: {names}", cause="checks")
    check_resume_source(run)
    detail = report.to_dict()
    detail["outputs"] = place_outputs(run, report.mount_choice)
    return "done", detail


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
