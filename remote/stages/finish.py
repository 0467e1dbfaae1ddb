"""The ``validate`` and ``publish`` stages: check the LoRA training left, then pack the bundle."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote.status import StageFailed

if TYPE_CHECKING:
    from remote.runner import Runner

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota on it


def newest_lora(output_dir: Path, name: str) -> Path | None:
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


def lora_path(run: "Runner") -> Path | None:
    """The LoRA to validate and publish: what the train stage recorded, else the newest on disk."""
    train = run.detail("train")
    for key in ("final_lora", "last_checkpoint"):
        if train.get(key) and Path(train[key]).is_file():
            return Path(train[key])
    return newest_lora(run.output / run.name, run.name)


def validate(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.validate import validate_lora, validate_samples

    lora = lora_path(run)
    if lora is None:
        raise StageFailed(f"training left no LoRA file in {run.output / run.name}",
                          cause="validate")
    lora_report = validate_lora(lora, rank=run.detail("config").get("rank"))
    sampling = ((run.spec.get("training") or {}).get("sample") or {}).get("enabled", True)
    samples = validate_samples(run.output / run.name / "samples", expected=sampling)
    for problem in samples["problems"]:
        run.warn(f"samples: {problem}")
    detail = {"ok": lora_report["ok"], "lora": lora_report,
              "samples": {k: v for k, v in samples.items() if k != "files"}}
    run.recorder.event("validation", ok=lora_report["ok"], problems=lora_report["problems"],
                       samples=samples["count"])
    if not lora_report["ok"]:
        raise StageFailed(f"{lora.name} failed validation: "
                          + "; ".join(lora_report["problems"][:10]), cause="validate")
    return "done", detail


def publish(run: "Runner") -> tuple[str, dict[str, Any]]:
    from remote.publish.bundle import pack_run

    lora = lora_path(run)
    if lora is None:
        raise StageFailed("nothing to publish: no LoRA file", cause="publish")
    config = run.detail("config")
    state = "stopped" if run.recorder.stage("train")["state"] == "stopped" else "done"
    dataset_dir = run.detail("ingest").get("dataset_dir")
    publish_dir = run.run_dir / "publish"
    try:
        files = pack_run(
            plan=run.plan, status=run.recorder.status, lora=lora,
            config_path=Path(config["config_path"]),
            dataset_dir=Path(dataset_dir) if dataset_dir else None,
            prompts=config.get("prompts") or [], hardware=run.detail("checks").get("gpu") or {},
            train=run.detail("train"), validation=run.detail("validate"),
            spend_usd=run.guard.spend(), hours=run.guard.hours(), state=state,
            ended_at=run.clock())
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise StageFailed(f"no space left on the instance's disk while packing the bundle into "
                          f"{publish_dir} ({exc})", cause="disk_full") from exc
    run.recorder.event("published", files=len(files), state=state)
    if run.wandb_enabled():  # the receipt exists only now: add it to the W&B run's summary
        from remote.wandb_log import summarize_run

        summarize_run(python=run.detail("bootstrap").get("python") or sys.executable,
                      output_dir=run.output / run.name, env=run.trainer_env(),
                      files=[run.run_dir / "publish" / "receipt.json",
                             run.work / "quality_report.json"], log=run.log.agent)
    return "done", {"files": len(files), "publish_dir": str(publish_dir)}
