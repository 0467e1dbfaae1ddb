"""The controller's own SSH key pair (ed25519), kept in the state dir and attached to instances."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from controller.errors import TransportError
from controller.state import write_text_atomic

KEY_NAME = "id_ed25519"


def ensure_keypair(state_dir: Path) -> tuple[Path, str]:
    """Return (private key path, public key line), creating the pair on first use.

    The private key is OpenSSH format, mode 0600 in a 0700 folder (ssh refuses wider); an existing
    key is reused, its mode tightened if someone loosened it, and a lost ``.pub`` is re-derived.
    """
    folder = Path(state_dir) / "ssh"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    private = folder / KEY_NAME
    public = folder / f"{KEY_NAME}.pub"
    fresh = not private.exists()
    if fresh:
        _generate(private)
    os.chmod(private, 0o600)
    if fresh or not public.exists():
        write_text_atomic(public, _public_line(private) + "\n", mode=0o644)
    line = public.read_text(encoding="utf-8").strip()
    return private, line


def _generate(private: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_text_atomic(private, pem.decode("ascii"), mode=0o600)


def _public_line(private: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (ValueError, OSError) as exc:
        raise TransportError(
            f"cannot read the controller's SSH key {private}: {exc}",
            hint="move it away; a new key pair is made on the next run",
        ) from exc
    body = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{body.decode('ascii')} flux-remote@{socket.gethostname()}"
