"""Assemble ``publish/`` and its ``SHA256SUMS``.

The bundle is built in a sibling folder and moved into place whole, with ``SHA256SUMS`` (sha256sum
format: ``<hex>  <relative path>``) written last, so a reader never sees a half-packed bundle whose
checksums verify. A pack that fails (a full disk) removes its staging folder before the error
goes on: the space it held is what the agent needs to report the failure in ``status.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

SUMS = "SHA256SUMS"
LOSS_HISTORY = "loss.jsonl"  # the bundle's copy of work/loss.jsonl


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(directory: Path) -> list[str]:
    """Relative posix paths of every file in the bundle except SHA256SUMS, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != SUMS and not p.name.startswith(".sums"))


def write_sha256sums(directory: Path) -> Path:
    lines = [f"{sha256_file(directory / rel)}  {rel}\n" for rel in bundle_files(directory)]
    target = directory / SUMS
    tmp = directory / f".sums.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


def verify_sha256sums(directory: Path) -> list[str]:
    """Problems found (empty = every listed file matches and no file is unlisted)."""
    try:
        text = (directory / SUMS).read_text(encoding="utf-8")
    except OSError as exc:
        return [f"cannot read {SUMS}: {exc}"]
    problems, listed = [], set()
    for line in text.splitlines():
        digest, _, rel = line.partition("  ")
        listed.add(rel)
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: checksum differs")
    problems += [f"{rel}: not listed" for rel in bundle_files(directory) if rel not in listed]
    return problems


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)


def assemble_bundle(publish_dir: Path, *, name: str, lora: Path, samples: Iterable[Path],
                    config_path: Path, run_yaml: str, quality_report: Path | None,
                    captions: Iterable[Path], model_card: str, receipt: dict[str, Any],
                    report_html: str, loss_history: Path | None = None) -> list[str]:
    """Build the bundle and move it to ``publish_dir``; returns the files it holds.

    ``loss_history`` (the runner's ``work/loss.jsonl``: one ``{"step", "loss", "lr", "t"}`` per
    line, a step repeated after a resume) is carried as ``loss.jsonl`` so that the curve can be
    drawn again at home (``controller.batch.report``) without the agent's log."""
    staging = publish_dir.with_name(f".{publish_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _fill(staging, name=name, lora=lora, samples=samples, config_path=config_path,
              run_yaml=run_yaml, quality_report=quality_report, captions=captions,
              model_card=model_card, receipt=receipt, report_html=report_html,
              loss_history=loss_history)
        write_sha256sums(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if publish_dir.exists():
        shutil.rmtree(publish_dir)
    os.replace(staging, publish_dir)
    return bundle_files(publish_dir)


def _fill(staging: Path, *, name: str, lora: Path, samples: Iterable[Path], config_path: Path,
          run_yaml: str, quality_report: Path | None, captions: Iterable[Path], model_card: str,
          receipt: dict[str, Any], report_html: str, loss_history: Path | None) -> None:
    _copy(lora, staging / f"{name}.safetensors")
    for sample in samples:
        _copy(sample, staging / "samples" / sample.name)
    _copy(config_path, staging / "config.yaml")
    (staging / "run.yaml").write_text(run_yaml, encoding="utf-8")
    if quality_report is not None and quality_report.is_file():
        _copy(quality_report, staging / "quality_report.json")
    if loss_history is not None and loss_history.is_file():
        _copy(loss_history, staging / LOSS_HISTORY)
    for caption in captions:
        _copy(caption, staging / "captions" / caption.name)
    (staging / "README.md").write_text(model_card, encoding="utf-8")
    (staging / "receipt.json").write_text(json.dumps(receipt, indent=2, default=str) + "\n",
                                          encoding="utf-8")
    (staging / "report.html").write_text(report_html, encoding="utf-8")


# -- gathering a run's outputs -----------------------------------------------------------------
def read_loss_points(path: Path) -> list[tuple[int, float]]:
    """(step, loss) from ``work/loss.jsonl``; a step logged twice (after a resume) keeps the
    last value."""
    by_step: dict[int, float] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = float(row["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(by_step.items())


def sample_grid(samples_dir: Path) -> dict[int, dict[int, Path]]:
    """step -> prompt index -> newest image, from ai-toolkit's sample names."""
    from remote.validate import parse_sample_name

    grid: dict[int, dict[int, Path]] = {}
    for path in sorted(samples_dir.glob("*")) if samples_dir.is_dir() else []:
        parsed = parse_sample_name(path.name)
        if parsed:
            grid.setdefault(parsed[0], {})[parsed[1]] = path
    return grid


def checkpoint_steps(spec: dict[str, Any], done: Any) -> list[int]:
    """The steps the trainer saved at: every ``save_every`` before ``done``, and ``done``."""
    if not isinstance(done, int) or done <= 0:
        return []
    every = (spec.get("training") or {}).get("save_every")
    saves = list(range(every, done, every)) if isinstance(every, int) and every > 0 else []
    return saves + [done]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pack_run(*, plan: dict[str, Any], status: dict[str, Any], lora: Path, config_path: Path,
             dataset_dir: Path | None, prompts: list[str], hardware: dict[str, Any],
             train: dict[str, Any], validation: dict[str, Any], spend_usd: float, hours: float,
             state: str, ended_at: float) -> list[str]:
    """Gather everything a finished (or stopped) run made into ``<run_dir>/publish``."""
    import yaml

    from remote.publish.model_card import fill_trigger, render_model_card
    from remote.publish.receipt import build_receipt
    from remote.publish.report_html import render_report

    spec = plan["spec"]
    name = plan["name"]
    run_dir = Path(plan["run_dir"])
    work = run_dir / "work"
    samples_dir = lora.parent / "samples"
    caption_ext = (spec.get("dataset") or {}).get("caption_ext", "txt")
    trigger = spec.get("trigger_word")
    started = [e["started_at"] for e in status.get("stages", {}).values() if e.get("started_at")]
    receipt = build_receipt(plan=plan, status=status, hardware=hardware, train=train,
                            validation=validation, spend_usd=spend_usd, hours=hours,
                            started_at=min(started) if started else ended_at, ended_at=ended_at,
                            state=state)
    grid = sample_grid(samples_dir)
    filled = [fill_trigger(p, trigger) for p in prompts]
    newest = grid[max(grid)] if grid else {}
    widget = [(filled[i] if i < len(filled) else f"sample {i}", f"samples/{path.name}")
              for i, path in sorted(newest.items())]
    report = render_report(name=name, state=state,
                           loss_points=read_loss_points(work / "loss.jsonl"),
                           sample_grid=grid, prompts=filled,
                           gate=_read_json(work / "quality_report.json"),
                           excluded=_read_json(work / "excluded.json") or [],
                           validation=validation, receipt=receipt,
                           checkpoints=checkpoint_steps(spec, train.get("step")))
    captions = sorted(dataset_dir.glob(f"*.{caption_ext}")) if dataset_dir else []
    samples = [p for row in grid.values() for p in row.values()]
    return assemble_bundle(
        run_dir / "publish", name=name, lora=lora, samples=sorted(samples),
        config_path=config_path,
        run_yaml=yaml.safe_dump(spec, sort_keys=False, allow_unicode=True),
        quality_report=work / "quality_report.json", captions=captions,
        loss_history=work / "loss.jsonl",
        model_card=render_model_card(spec, lora_file=f"{name}.safetensors", widget=widget,
                                     receipt=receipt),
        receipt=receipt, report_html=report)
