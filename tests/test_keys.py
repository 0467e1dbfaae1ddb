"""The controller's own key pair: made once, private, reused, usable by paramiko and ssh."""

from __future__ import annotations

import os
from pathlib import Path

from controller.hosts.keys import ensure_keypair
from controller.state import known_hosts_path, state_dir


def test_state_dir_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLUX_REMOTE_HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home" and (tmp_path / "home").is_dir()
    assert known_hosts_path() == tmp_path / "home" / "known_hosts"


def test_keypair_is_created_private_and_reused(tmp_path: Path) -> None:
    import paramiko

    private, public = ensure_keypair(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.parent.stat().st_mode & 0o777 == 0o700
    assert public.startswith("ssh-ed25519 AAAA") and public.count(" ") == 2
    loaded = paramiko.PKey.from_path(str(private))
    assert f"{loaded.get_name()} {loaded.get_base64()}" == " ".join(public.split()[:2])
    assert ensure_keypair(tmp_path) == (private, public)


def test_a_loosened_key_is_tightened_and_a_lost_public_key_rederived(tmp_path: Path) -> None:
    private, public = ensure_keypair(tmp_path)
    os.chmod(private, 0o644)
    Path(f"{private}.pub").unlink()
    again_private, again_public = ensure_keypair(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert again_public.split()[:2] == public.split()[:2]


def test_a_lost_private_key_gives_a_matching_new_pair(tmp_path: Path) -> None:
    private, public = ensure_keypair(tmp_path)
    private.unlink()
    _, new_public = ensure_keypair(tmp_path)
    assert new_public != public
    assert Path(f"{private}.pub").read_text().strip() == new_public


def test_the_key_logs_in_to_a_real_sshd(sshd, tmp_path: Path) -> None:
    from controller.hosts.ssh import SshHost, SshTarget

    private, public = ensure_keypair(tmp_path / "state")
    authorized = sshd.root / "authorized_keys"
    authorized.write_text(authorized.read_text() + public + "\n")
    target = SshTarget(sshd.host, sshd.port, sshd.user, private, tmp_path / "known_hosts")
    with SshHost(target) as host:
        assert host.run("echo in").stdout == "in\n"
