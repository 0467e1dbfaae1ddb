"""The boundary with a stranger's machine: what goes out to an instance (secrets, the dataset),
what comes back (files, names, text, numbers) and the rsync that carries it (issue 16)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from controller.errors import SpecError, TransportError
from controller.hosts.local import LocalHost
from controller.hosts.rsync import run_rsync
from controller.hosts.rsync_version import check_rsync
from controller.run.fetch import STAGING, fetch_bundle
from controller.run.follow import RunPaths
from controller.run.ship import secrets_for, upload_run
from controller.spec.loader import load_spec
from controller.untrusted import UntrustedInput, clean_text, inside_run_dir, integer, number
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


def test_terminal_control_sequences_are_stripped_and_markup_kept() -> None:
    evil = ("[bold]x[/] \x1b]52;c;ZXZpbA==\x07 \x1b[2J\x1b[H\x1b[31mred\x1b[0m \x07bell "
            "\x9b31m \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ \x00\x08\x7f\rdone")
    clean = clean_text(evil)
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7f <= ord(c) <= 0x9f for c in clean)
    assert clean.startswith("[bold]x[/]") and "red" in clean and "link" in clean
    assert "ZXZpbA" not in clean  # the OSC 52 payload goes with its sequence
    assert clean_text("a\nb", keep_newlines=False) == "a b"
    assert clean_text("x" * 50, limit=10) == "x" * 10 + "…"


@pytest.mark.parametrize("value", ["lots", "NaN", "inf", True, [1], {"a": 1}, float("nan")])
def test_a_number_from_the_instance_must_be_a_finite_number(value: object) -> None:
    with pytest.raises(UntrustedInput, match="'loss'"):
        number(value, field="loss", where="status.json")


def test_numbers_and_whole_numbers_that_are_fine() -> None:
    assert number(None, field="x", where="w") is None
    assert number("1.5", field="x", where="w") == 1.5 and number(2, field="x", where="w") == 2.0
    assert integer(3.0, field="step", where="w") == 3
    with pytest.raises(UntrustedInput, match="whole number"):
        integer(2.5, field="step", where="w")


def test_a_path_the_agent_names_must_stay_in_its_run_dir() -> None:
    run = "/workspace/flux-remote/r1"
    assert inside_run_dir("output/x/step_4", run, field="f", where="w") == f"{run}/output/x/step_4"
    assert inside_run_dir(f"{run}/output/a", run, field="f", where="w") == f"{run}/output/a"
    for bad in ("../r2/x", f"{run}/../r2", "/etc/passwd", "/workspace/flux-remote/r1x/a", "",
                run, 7, "a\x1b[2Jb"):
        with pytest.raises(UntrustedInput):
            inside_run_dir(bad, run, field="f", where="w")


def make_publish(root: Path, files: dict[str, bytes], extra_sums: str = "") -> Path:
    import hashlib

    pub = root / "publish"
    for name, data in files.items():
        (pub / name).parent.mkdir(parents=True, exist_ok=True)
        (pub / name).write_bytes(data)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items())
    (pub / "SHA256SUMS").write_text(sums + extra_sums)
    return root


def test_only_listed_verified_files_move_into_the_out_dir(tmp_path: Path) -> None:
    run = make_publish(tmp_path / "run", {"a.safetensors": b"w", "samples/0.png": b"p"})
    (run / "publish" / "unlisted.sh").write_text("rm -rf ~")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "agent.log").write_text("ours")
    result = fetch_bundle(LocalHost(), RunPaths(str(run)), out)
    assert result.files_verified == 2
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == ["SHA256SUMS", "a.safetensors", "logs/agent.log", "samples/0.png"]
    assert not (out / STAGING).exists()


@pytest.mark.parametrize("name", ["logs/agent.log", "controller_receipt.json",
                                  "checkpoints/x.safetensors"])
def test_a_bundle_may_not_list_the_controllers_own_names(tmp_path: Path, name: str) -> None:
    run = make_publish(tmp_path / "run", {"a.safetensors": b"w", name: b"forged"})
    out = tmp_path / "out"
    with pytest.raises(UntrustedInput, match="keeps for itself"):
        fetch_bundle(LocalHost(), RunPaths(str(run)), out)
    assert not (out / name).exists() and not (out / "a.safetensors").exists()


def test_a_bundle_over_its_cap_is_not_brought_home(tmp_path: Path) -> None:
    run = make_publish(tmp_path / "run", {"a.bin": b"x" * 600, "b.bin": b"y" * 600})
    out = tmp_path / "out"
    with pytest.raises(UntrustedInput, match="more than the cap"):
        fetch_bundle(LocalHost(), RunPaths(str(run)), out, max_bytes=1000)
    assert not (out / STAGING).exists() and not (out / "a.bin").exists()


def test_a_stalling_rsync_is_stopped_and_not_retried(tmp_path: Path) -> None:
    script = tmp_path / "rsync"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    sleeps: list[float] = []
    with pytest.raises(TransportError, match="ran past"):
        run_rsync([str(script)], pushing=False, where="h", sleep=sleeps.append,
                  attempt_timeout_s=0.5)
    assert sleeps == []
