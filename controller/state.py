"""Where the controller keeps its own files: the journal, its SSH key pair, pinned host keys.

``FLUX_REMOTE_HOME`` overrides the platform default (tests point it at a temp folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """The state directory, created (0700) on first use."""
    override = os.environ.get("FLUX_REMOTE_HOME")
    if override:
        path = Path(override).expanduser()
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("flux-remote"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def known_hosts_path() -> Path:
    """The OpenSSH-format file of host keys pinned on first contact (paramiko and ssh read it)."""
    return state_dir() / "known_hosts"


def write_text_atomic(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` so no reader ever sees half of it (temp, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
