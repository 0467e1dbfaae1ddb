"""One container per fake instance: its own disk and its own sshd, ended with the instance.

Without this, every FakeVast instance is this machine: one filesystem, so what one instance
installs or caches under the run's ``remote_root`` (the onstart marker, the agent's caches) is
already there on the next one, which a real new instance never has. A Vast instance is a Docker
container with its own disk (reference README: storage is allocated per instance) whose
processes all end when it is destroyed (docs.vast.ai: destroying an instance deletes its data).

Here a container is a mount namespace (``unshare --mount``) in which ``<base>/<iid>/disk`` is
bind-mounted over ``remote_root``, with an sshd of its own inside it (``tests.fixtures_sshd``);
the fake runs the onstart script in the same namespace (``nsenter``). Destroying the instance
kills every process of that namespace (the agent, its watchdog, onstart) and deletes the disk.
It needs root (mount namespaces); :func:`unavailable` says why not when it cannot work.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from tests.fixtures_sshd import SshServer

_MOUNT_AND_EXEC = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def unavailable() -> str | None:
    """Why containers cannot be made on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "fake containers need root (a mount namespace per instance)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"fake containers need {tool}"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"unshare --mount failed: {probe.stderr.strip()}"
    return None


def _namespace_pids(mnt_ns: str) -> list[int]:
    """Every process whose mount namespace is ``mnt_ns`` (the readlink of /proc/PID/ns/mnt)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") == mnt_ns:
                found.append(int(entry))
        except OSError:
            continue
    return found


class Containers:
    """The ``containers`` knob of ``tests.fakevast.FakeVast``."""

    def __init__(self, base: Path, client_key: Path, remote_root: Path) -> None:
        self.base = base
        self.client_key = client_key
        self.remote_root = remote_root
        self.booted: list[int] = []
        self._servers: dict[int, SshServer] = {}
        self._lock = threading.Lock()
        remote_root.mkdir(parents=True, exist_ok=True)

    def boot(self, iid: int) -> tuple[str, int]:
        """Start instance ``iid``'s container (once) and return its SSH endpoint."""
        with self._lock:
            server = self._servers.get(iid)
            if server is None:
                disk = self.base / str(iid) / "disk"
                disk.mkdir(parents=True)
                root = self.base / str(iid) / "sshd"
                root.mkdir(parents=True)
                server = SshServer(root, self.client_key)
                server.argv_prefix = ["unshare", "--mount", "--propagation", "private",
                                      "sh", "-c", _MOUNT_AND_EXEC, "container", str(disk),
                                      str(self.remote_root)]
                server.start()
                self._servers[iid] = server
                self.booted.append(iid)
            return server.host, server.port

    def exec_prefix(self, iid: int) -> list[str]:
        """argv that runs a command inside the container (the onstart script)."""
        server = self._servers[iid]
        return ["nsenter", "-t", str(server.pid), "-m", "--"]

    def destroy(self, iid: int) -> None:
        """End every process of the container, then delete its disk."""
        with self._lock:
            server = self._servers.pop(iid, None)
        if server is None:
            return
        pid = server.pid
        mnt_ns = os.readlink(f"/proc/{pid}/ns/mnt") if pid is not None else None
        server.stop()
        if mnt_ns is not None and mnt_ns != os.readlink("/proc/self/ns/mnt"):
            for victim in _namespace_pids(mnt_ns):
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.base / str(iid) / "disk", ignore_errors=True)

    def close(self) -> None:
        """Destroy what is left (instances the run under test never destroyed)."""
        for iid in list(self._servers):
            self.destroy(iid)
