"""What goes out to an instance, and what our rsync accepts back (issue 16, points 1, 7-9)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from controller.errors import SpecError
from controller.hosts.local import LocalHost
from controller.hosts.rsync_version import check_rsync
from controller.run.follow import RunPaths
from controller.run.ship import secrets_for, upload_run
from controller.spec.loader import load_spec
from tests.test_launch_local import write_spec


def spec_with(tmp_path: Path, **extra: object):
    return load_spec(write_spec(tmp_path, **extra))


def test_secrets_are_the_fewest_the_instance_needs(tmp_path: Path) -> None:
    env = {"HF_TOKEN": "hf_write", "WANDB_API_KEY": "w" * 40}
    schnell = spec_with(tmp_path, name="s", base_model="flux-schnell")
    assert secrets_for(schnell, env) == ({}, [])  # nothing gated, W&B off
    dev = spec_with(tmp_path, name="d")  # flux-dev: gated
    values, warnings = secrets_for(dev, env)
    assert values == {"HF_TOKEN": "hf_write"} and "HF_READ_TOKEN" in warnings[0]
    values, warnings = secrets_for(dev, {**env, "HF_READ_TOKEN": "hf_read"})
    assert values == {"HF_TOKEN": "hf_read"} and warnings == []
    wandb = spec_with(tmp_path, name="w", base_model="flux-schnell", wandb={"enabled": True})
    assert secrets_for(wandb, env)[0] == {"WANDB_API_KEY": "w" * 40}
    gated_captioner = spec_with(tmp_path, name="c", base_model="flux-schnell",
                                captioning={"mode": "model", "model": "someone/gated-vlm"})
    assert secrets_for(gated_captioner, {"HF_READ_TOKEN": "hf_read"})[0] == {"HF_TOKEN": "hf_read"}


def test_only_images_and_captions_are_uploaded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".git").mkdir()
    (data / "a.png").write_bytes(b"png")
    (data / "a.txt").write_text("a caption")
    (data / "B.JPG").write_bytes(b"jpg")
    (data / "sub" / "c.webp").write_bytes(b"webp")
    (data / "notes.pdf").write_bytes(b"pdf")
    (data / ".env").write_text("HF_TOKEN=hf_secret")
    (data / ".git" / "config").write_text("[core]")
    (data / "empty").mkdir()
    (data / "empty" / "x.doc").write_bytes(b"doc")
    run_dir = tmp_path / "remote" / "run"
    upload_run(LocalHost(), RunPaths(str(run_dir)), data)
    sent = sorted(p.relative_to(run_dir / "dataset").as_posix()
                  for p in (run_dir / "dataset").rglob("*"))
    assert sent == ["B.JPG", "a.png", "a.txt", "sub", "sub/c.webp"]


@pytest.mark.parametrize("case", ["home", "root", "ssh", "config", "many"])
def test_a_dataset_that_must_not_leave_is_refused_with_its_location(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    data = tmp_path / "data"
    spec = write_spec(tmp_path)  # copies the demo images into data/
    if case == "home":
        monkeypatch.setenv("HOME", str(data))
    elif case == "root":
        text = spec.read_text().replace(str(data), "/")
        spec.write_text(text)
    elif case in ("ssh", "config"):
        (data / f".{case}").mkdir()
    else:
        for n in range(20):
            (data / f"extra{n}.txt").write_text("x")
        text = spec.read_text().replace("dataset:\n", "dataset:\n  max_files: 10\n")
        spec.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    message = str(info.value)
    assert f"{spec}:" in message and "dataset.path" in message, message
    expected = {"home": "home folder", "root": "root folder", "ssh": ".ssh",
                "config": ".config", "many": "more than 10 files"}[case]
    assert expected in message


def test_the_ship_step_refuses_such_a_folder_too(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / ".ssh").mkdir(parents=True)
    (data / "a.png").write_bytes(b"png")
    with pytest.raises(SpecError, match=r"dataset.path: .*\.ssh"):
        upload_run(LocalHost(), RunPaths(str(tmp_path / "r" / "run")), data)
    assert not (tmp_path / "r").exists()


def test_a_download_creates_no_links_modes_or_oversized_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("laptop secret")
    src = tmp_path / "instance" / "publish"
    (src / "sub").mkdir(parents=True)
    (src / "ok.txt").write_text("ok")
    (src / "ok.txt").chmod(0o4777)
    (src / "README.md").symlink_to(secret)
    (src / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    (src / "big.bin").write_bytes(b"x" * 5000)
    os.mkfifo(src / "fifo")
    out = tmp_path / "out"
    LocalHost().download(str(src), out, max_bytes=1000)
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert got == ["ok.txt", "sub"]
    mode = stat.S_IMODE((out / "ok.txt").stat().st_mode)
    assert not mode & (stat.S_ISUID | stat.S_IWOTH), oct(mode)


def fixed(version: str, changelog: str | None = None, binary: str = "/usr/bin/rsync"):
    return check_rsync(version=lambda: f"rsync  version {version}  protocol version 31\n",
                       changelog=lambda: changelog, binary=lambda: binary)


def test_rsync_version_warns_below_the_fix_and_refuses_only_a_known_unfixed_build() -> None:
    assert fixed("3.4.3").ok and not fixed("3.4.3").message
    newer_than_january = fixed("3.4.1")
    assert newer_than_january.ok and "3.4.3" in newer_than_january.message
    backported = fixed("3.2.7", changelog="rsync (3.2.7-1+deb12u1) ... CVE-2024-12084 ...")
    assert backported.ok and not backported.refuse
    unknown_build = fixed("3.2.7", changelog=None)  # no package changelog: cannot tell
    assert not unknown_build.ok and not unknown_build.refuse
    assert "3.2.7" in unknown_build.message and "3.4.1" in unknown_build.message
    elsewhere = fixed("3.2.7", changelog="no cve here", binary="/usr/local/bin/rsync")
    assert not elsewhere.refuse  # the changelog is not this binary's
    unfixed = fixed("3.2.7", changelog="rsync (3.2.7-1) unstable; nothing about CVEs")
    assert unfixed.refuse and "CVE-2024-12086" in unfixed.message
    odd = check_rsync(version=lambda: "openrsync: protocol version 29", changelog=lambda: None)
    assert not odd.ok and not odd.refuse and "openrsync" in odd.message


def test_preflight_refuses_a_known_unfixed_rsync_before_renting(tmp_path: Path) -> None:
    from controller.hosts.rsync_version import RsyncVerdict
    from controller.run.launch import machine_checks

    spec = spec_with(tmp_path, provider={"type": "ssh", "host": "gpu.example"})
    verdict = RsyncVerdict("3.2.7", ok=False, refuse=True, message="rsync 3.2.7 lacks the fixes")
    checks = machine_checks(spec, env={}, which=lambda tool: f"/usr/bin/{tool}",
                            rsync_verdict=lambda: verdict)
    [check] = [c for c in checks if c.name == "rsync version"]
    assert not check.ok and "3.2.7" in check.result
    warn = RsyncVerdict("3.2.7", ok=False, message="rsync 3.2.7 is older than 3.4.0")
    checks = machine_checks(spec, env={}, which=lambda tool: f"/usr/bin/{tool}",
                            rsync_verdict=lambda: warn)
    assert [c.ok for c in checks if c.name == "rsync version"] == [True]
