"""A real OpenSSH server on 127.0.0.1 for transport and end-to-end tests.

``sshd`` (function scope: each test gets its own server, so dropping connections or stopping the
server never disturbs another test) runs ``/usr/sbin/sshd -D -e -f <config>`` on a free port with
its own ed25519 host key, and authorises a client key made once per session. As root it creates the
privilege-separation dir ``/run/sshd`` and permits root login; as anyone else sshd runs unprivileged
and only lets that same user in. Tests are skipped (with the reason) when sshd, ssh-keygen or rsync
is missing.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from controller.hosts.ssh import SshTarget

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 10.0


def _missing_tools() -> str | None:
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed (apt install openssh-server)"
    for tool in ("ssh-keygen", "ssh", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flux-remote-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class SshServer:
    """One sshd. ``.target(known_hosts)`` gives what ``SshHost`` needs to reach it."""

    def __init__(self, root: Path, client_key: Path) -> None:
        self.root = root
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.user = getpass.getuser()
        self.key_path = client_key
        self.host_key_path = root / "ssh_host_ed25519_key"
        self.config_path = root / "sshd_config"
        self.log_path = root / "sshd.log"
        self.pid_path = root / "sshd.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        # Run sshd through this (e.g. unshare, for tests.fakecontainer); it must exec sshd.
        self.argv_prefix: list[str] = []
        _keygen(self.host_key_path)
        authorized = root / "authorized_keys"
        authorized.write_text(Path(f"{client_key}.pub").read_text())
        authorized.chmod(0o600)
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.pid_path}",
                    f"AuthorizedKeysFile {authorized}",
                    "UsePAM no",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    f"PermitRootLogin {'yes' if os.geteuid() == 0 else 'no'}",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def target(self, known_hosts_path: Path) -> SshTarget:
        return SshTarget(self.host, self.port, self.user, self.key_path, Path(known_hosts_path))

    def start(self) -> None:
        """Start (or restart) on the same port with the same keys; returns once it answers."""
        if self.pid is not None:
            return
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [*self.argv_prefix, SSHD, "-D", "-e", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self._proc.returncode}:\n{self.log_path.read_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port}:\n{self.log_path.read_text()}")

    def kill_connections(self) -> int:
        """SIGKILL every sshd process serving a connection (not the listener, not user commands).

        Processes started in their own session by the client keep running. Returns how many died.
        """
        if self.pid is None:
            return 0
        victims: list[int] = []
        queue = _children(self.pid)
        while queue:
            pid = queue.pop()
            if _comm(pid).startswith("sshd"):
                victims.append(pid)
                queue.extend(_children(pid))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def stop(self) -> None:
        """Stop the listener and drop every connection (by PID)."""
        if self._proc is None:
            return
        self.kill_connections()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def change_host_key(self) -> None:
        """Restart with a brand-new host key (what a pinned client must refuse)."""
        self.stop()
        for path in (self.host_key_path, Path(f"{self.host_key_path}.pub")):
            path.unlink(missing_ok=True)
        _keygen(self.host_key_path)
        self.start()


@pytest.fixture(scope="session")
def sshd_client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One client key pair per test session (what the server authorises)."""
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    key = tmp_path_factory.mktemp("sshd-client") / "id_ed25519"
    _keygen(key)
    return key


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory, sshd_client_key: Path) -> Iterator[SshServer]:
    """A running sshd for this test; stopped by PID afterwards."""
    server = SshServer(tmp_path_factory.mktemp("sshd"), sshd_client_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd_changed_hostkey(sshd: SshServer):
    """A function that restarts this test's ``sshd`` with a new host key (pins must refuse it)."""
    return sshd.change_host_key
