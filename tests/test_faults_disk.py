"""A full disk on the instance, for real: the agent (``python -m remote run plan.json``, tiny
trainer) with part of its run directory on a small tmpfs.

Two places run out: the checkpoints (a tmpfs on ``output/`` only, the folder the trainer's big
writes go to; the run dir itself, and so ``status.json``, stays on the ordinary disk) and the
publish pack (the whole run dir on a tmpfs, filled by a ballast file once training is over, as
another process filling the instance's disk would). Either way the run ends ``failed`` with
cause ``disk_full`` and a message that names the full disk and where, and ``publish/`` holds no
bundle whose SHA256SUMS lists a truncated or missing file. Mounting needs root (or
CAP_SYS_ADMIN); without it the tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote.publish.bundle import SUMS, verify_sha256sums
from remote.status import read_events, read_status
from tests.faults import record
from tests.test_runner import run_agent, tiny_spec, write_plan

Mount = Callable[[Path, str], Path]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """``tmpfs(path, size)`` mounts a tmpfs of ``size`` (mount's syntax: ``64k``) on ``path``;
    every mount is undone at teardown. Skips the test where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                                   "tmpfs", str(path)], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def used_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def resize_tmpfs(path: Path, size: int) -> None:
    """Change the size of the tmpfs on ``path`` (in bytes; rounded up to whole pages)."""
    done = subprocess.run(["mount", "-o", f"remount,size={size}", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def assert_no_bad_bundle(run_dir: Path) -> None:
    """Either no SHA256SUMS at all, or every file it lists verifies (and none is unlisted)."""
    publish = run_dir / "publish"
    if (publish / SUMS).exists():
        assert verify_sha256sums(publish) == []
    assert not (run_dir / ".publish.partial").exists(), "the half-packed bundle was left behind"


def assert_failed_for_disk_full(run_dir: Path, stage: str, where: Path) -> dict:
    status = read_status(run_dir)
    assert status is not None, "status.json is unreadable"
    assert status["state"] == "failed" and status["stage"] == stage, status
    assert status["cause"] == "disk_full", status
    headline = (status["error"] or "").splitlines()[0]  # the trainer's log tail may follow
    assert "no space left" in headline.lower() and str(where) in headline, status["error"]
    assert status["stages"][stage]["state"] == "failed"
    assert read_events(run_dir)[-1]["event"] == "run_end"
    return status


def test_checkpoints_that_do_not_fit_fail_the_run_clearly(tmp_path: Path, small_dataset: Path,
                                                          tmpfs: Mount) -> None:
    plan = write_plan(tmp_path, tiny_spec(small_dataset), small_dataset)
    run_dir = plan.parent
    # config.yaml and the step-0 samples fit; the first checkpoint (LoRA + optimizer.pt) does not
    output = tmpfs(run_dir / "output", "64k")
    assert run_agent(plan) == 1, (run_dir / "agent.log").read_text()[-3000:]
    status = assert_failed_for_disk_full(run_dir, "train", output)
    assert status["stages"]["ingest"]["state"] == "done"
    assert status["last_checkpoint"] is None
    assert_no_bad_bundle(run_dir)
    leftovers = [p.name for p in output.rglob(".*.tmp")]
    assert leftovers == [], f"a failed save left its temp file: {leftovers}"
    record("agent:disk-full-checkpoint")  # no LoRA existed to lose: nothing to observe


def test_a_bundle_that_does_not_fit_fails_clearly_and_leaves_none(tmp_path: Path,
                                                                  small_dataset: Path,
                                                                  tmpfs: Mount) -> None:
    # big enough for the checks stage's free-space check (a tmpfs only uses what it holds)
    disk = tmpfs(tmp_path / "disk", "1g")
    plan = write_plan(disk, tiny_spec(small_dataset), small_dataset)
    run_dir = plan.parent
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    bundle_bytes = sum(p.stat().st_size for p in (run_dir / "publish").rglob("*"))
    shutil.rmtree(run_dir / "publish")  # the agent packs a missing bundle again, nothing else

    # the disk fills up until only half the bundle would fit: the pack runs out midway; once
    # its partial copy is gone there is room again for status.json and the logs
    resize_tmpfs(disk, used_bytes(disk) + bundle_bytes // 2)
    assert run_agent(plan) == 1, (run_dir / "agent.log").read_text()[-3000:]
    assert_failed_for_disk_full(run_dir, "publish", run_dir / "publish")
    assert_no_bad_bundle(run_dir)
    assert "Traceback" not in (read_status(run_dir) or {}).get("error", "")

    resize_tmpfs(disk, 1 << 30)  # space freed: the same plan packs the bundle
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    assert verify_sha256sums(run_dir / "publish") == []
    record("agent:disk-full-publish", bundles=[run_dir / "publish"])
