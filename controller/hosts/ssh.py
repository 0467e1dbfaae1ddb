"""``SshHost``: the Host interface over SSH, with host keys pinned on first contact.

paramiko is used directly rather than through fabric's ``Connection``: we need the transport
itself (keepalive, the host-key check done by us before authenticating, the pinned key type
preferred in the key exchange, reconnecting on our own schedule) and a channel with raw stdin
bytes; fabric would add a layer whose defaults (auto-adding host keys, pty options, watchers)
all have to be turned off.

Host keys are pinned in one OpenSSH-format ``known_hosts`` (:mod:`controller.hosts.known_hosts`,
usually ``controller.state.known_hosts_path()``), so the ``ssh`` that rsync runs reads the very
same pins with ``StrictHostKeyChecking=yes``; the pin is written by the first paramiko
connection, which every transfer makes sure of before rsync starts.
"""

from __future__ import annotations

import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from controller.errors import ProviderError, TransportError
from controller.hosts import rsync
from controller.hosts.base import CommandFailed, CommandResult
from controller.hosts.known_hosts import (host_key_name, pin_host_key, pinned_keys,
                                          replace_host_key)
from controller.hosts.rsync import TransferStats
from controller.hosts.shell import (
    MISSING_EXIT,
    MISSING_MARK,
    alive_command,
    read_command,
    start_command,
    write_command,
)

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "CommandTimeout",
    "ConnectionLost",
    "SshHost",
    "SshTarget",
    "Unreachable",
    "host_key_name",
    "ssh_argv",
]

RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
GIVE_UP_EVERY_S = 15.0  # the reconnect loop asks its give_up hook at most this often


class ConnectionLost(TransportError):
    """The connection dropped while a command ran; the command's outcome is unknown."""


class CommandTimeout(TransportError):
    """A command ran past its timeout; it was abandoned and the connection is reopened."""


class Unreachable(TransportError):
    """No connection could be made within the reconnect window, or the ``give_up`` hook said the
    machine is gone (then ``problem`` holds what it said; None when the window ran out)."""

    def __init__(
        self, message: str, *, hint: str | None = None, problem: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.problem = problem


@dataclass(frozen=True)
class SshTarget:
    """Where to connect, as whom, with which key; ``known_hosts_path`` holds the pins."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _ssh_config_value(path: Path) -> str:
    """A path as an ssh ``-o`` value: ssh splits these on spaces unless double-quoted."""
    text = str(path)
    if '"' in text:
        raise TransportError(f"{text}: a path with a double quote cannot be given to ssh")
    return f'"{text}"'


def ssh_argv(target: SshTarget, *, connect_timeout: float = 15.0) -> list[str]:
    """The ``ssh`` options rsync uses: our key only, no prompts, the pinned known_hosts only."""
    return [
        "ssh",
        "-F", "/dev/null",  # the user's ~/.ssh/config must not change where or how we connect
        "-i", str(target.key_path),
        "-p", str(target.port),
        "-l", target.user,
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={_ssh_config_value(target.known_hosts_path)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "-o", "Compression=no",  # datasets are images: already compressed
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


class SshHost:
    """A remote machine over one kept-alive paramiko connection (opened lazily, reopened on drop).

    ``sleep`` and ``clock`` drive the reconnect backoff and rsync retries (tests inject them);
    ``reconnect_window_s`` bounds how long a dead host is retried before Unreachable.
    ``repin_first``: the host is a newly rented instance, so the key it offers on its first
    key exchange replaces whatever the address had pinned (atomically; see
    :func:`~controller.hosts.known_hosts.replace_host_key`); later connections check against it.
    ``give_up`` (settable after construction; the orchestrator sets the provider's health while it
    follows a run) is asked between failed attempts, at most every ``GIVE_UP_EVERY_S``: a message
    (the instance is gone, outbid, offline) ends the loop at once with ``Unreachable.problem`` set,
    instead of retrying a dead host for the whole window; None or a ProviderError (the provider is
    unsure) keeps reconnecting. It must not use this host (it runs under its lock).
    ``io_timeout_s`` bounds the file and process calls (read_bytes, write_bytes, is_alive): a
    half-open connection (laptop asleep, NAT dropped) makes them time out, reconnect and retry
    once instead of hanging until TCP gives up; keepalives alone do not detect it.
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        connect_timeout: float = 15.0,
        keepalive_s: float = 15.0,
        reconnect_window_s: float = 120.0,
        io_timeout_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rsync_args: Sequence[str] = (),
        give_up: Callable[[], str | None] | None = None,
        repin_first: bool = False,
    ) -> None:
        self.target = target
        self.where = target.where
        self._connect_timeout = connect_timeout
        self._keepalive_s = keepalive_s
        self._window_s = reconnect_window_s
        self._io_timeout_s = io_timeout_s
        self._sleep = sleep
        self._clock = clock
        self._rsync_args = tuple(rsync_args)
        self.give_up = give_up
        self._repin = repin_first  # a new instance: its first key replaces the address's pin
        self._transport: paramiko.Transport | None = None
        self._lock = threading.RLock()
        self.connects = 0  # how many connections were made (tests and the UI read it)

    # -- connection ---------------------------------------------------------------------------

    def __enter__(self) -> SshHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def connect(self) -> None:
        """Make sure a live, authenticated connection exists (reconnecting with backoff)."""
        self._connected()

    def _connected(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            self.close()
            started = self._clock()
            asked: float | None = None  # when give_up was last asked in this loop
            attempt = 0
            while True:
                try:
                    self._transport = self._open()
                    self.connects += 1
                    return self._transport
                except (OSError, EOFError, _retryable_ssh_errors()) as exc:
                    now = self._clock()
                    if asked is None or now - asked >= GIVE_UP_EVERY_S:
                        asked = now
                        self._check_give_up(exc)
                    waited = now - started
                    if waited >= self._window_s:
                        raise Unreachable(
                            f"cannot reach {self.where} (tried for {waited:.0f} s): {exc}",
                            hint="is the machine up and its SSH port open?",
                        ) from exc
                    delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
                    attempt += 1
                    self._sleep(min(delay, max(0.0, self._window_s - waited)))

    def _check_give_up(self, exc: BaseException) -> None:
        """Ask the ``give_up`` hook once; raise Unreachable with its message if it has one."""
        if self.give_up is None:
            return
        try:
            problem = self.give_up()
        except ProviderError:
            return  # the provider cannot tell right now: keep reconnecting
        if problem:
            raise Unreachable(
                f"cannot reach {self.where}, and the machine is lost: {problem}",
                hint="the provider reports the machine gone; reconnecting cannot help",
                problem=problem,
            ) from exc

    def _open(self) -> paramiko.Transport:
        """One connection: TCP, key exchange, host-key check (pin on first use), key auth."""
        import paramiko

        t = self.target
        try:
            pkey = paramiko.PKey.from_path(str(t.key_path))
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise TransportError(f"cannot load the SSH key {t.key_path}: {exc}") from exc
        sock = socket.create_connection((t.host, t.port), timeout=self._connect_timeout)
        transport = paramiko.Transport(sock)
        try:
            pinned = pinned_keys(t.known_hosts_path, host_key_name(t.host, t.port))
            if pinned:  # ask for the pinned key type first, so the check compares like with like
                options = transport.get_security_options()
                types = list(options.key_types)
                options.key_types = [k for k in types if k in pinned] + [
                    k for k in types if k not in pinned
                ]
            transport.start_client(timeout=self._connect_timeout)
            if self._repin:
                replace_host_key(t.known_hosts_path, t.host, t.port,
                                 transport.get_remote_server_key())
                self._repin = False
            else:
                pin_host_key(t.known_hosts_path, t.host, t.port,
                             transport.get_remote_server_key())
            try:
                transport.auth_publickey(t.user, pkey)
            except paramiko.AuthenticationException as exc:
                if not transport.is_active():
                    # The connection died during auth (paramiko reports that as a failed auth):
                    # a drop, retried by the reconnect loop, not a refused key.
                    raise EOFError(f"connection to {self.where} closed during authentication") \
                        from exc
                raise TransportError(
                    f"{self.where} refused our key {t.key_path}: {exc}",
                    hint="is our public key in its authorized_keys (attached to the instance)?",
                ) from exc
            transport.set_keepalive(max(1, int(self._keepalive_s)))
            return transport
        except BaseException:
            transport.close()
            raise

    def _drop(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    # -- commands -----------------------------------------------------------------------------

    def _exec(
        self, command: str, stdin: bytes | None, timeout: float | None
    ) -> tuple[bytes, bytes, int]:
        """Run one command on a fresh channel. The channel is opened after a reconnect if the
        old connection turned out dead; once the command is sent, a drop is ConnectionLost."""
        import paramiko

        try:
            channel = self._connected().open_session(timeout=self._connect_timeout)
        except (paramiko.SSHException, EOFError, OSError):
            self._drop()  # the kept-alive connection died since the last call: one fresh try
            try:
                channel = self._connected().open_session(timeout=self._connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise ConnectionLost(f"cannot open a session on {self.where}: {exc}") from exc
        try:
            channel.exec_command(command)
            feeder = threading.Thread(target=_feed, args=(channel, stdin), daemon=True)
            feeder.start()
            out, err, code = _collect(channel, timeout)
            feeder.join(timeout=1.0)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._drop()
            raise ConnectionLost(f"connection to {self.where} lost: {exc}") from exc
        finally:
            channel.close()
        if code is None:
            self._drop()  # a silent connection may be half-open: the next call starts afresh
            raise CommandTimeout(f"command on {self.where} timed out after {timeout} s")
        if code == -1:
            self._drop()
            raise ConnectionLost(f"connection to {self.where} lost while a command ran")
        return out, err, code

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        out, err, code = self._exec(command, stdin, timeout)
        result = CommandResult(
            command=command,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            exited=code,
        )
        if check and not result.ok:
            raise CommandFailed(result, where=self.where)
        return result

    def _idempotent(self, command: str, stdin: bytes | None = None) -> tuple[bytes, bytes, int]:
        """Run a command that is safe to repeat; retried once after a lost connection or timeout."""
        try:
            return self._exec(command, stdin, self._io_timeout_s)
        except (ConnectionLost, CommandTimeout):
            return self._exec(command, stdin, self._io_timeout_s)

    def read_bytes(self, path: str, offset: int = 0, limit: int | None = None) -> bytes | None:
        out, err, code = self._idempotent(read_command(path, offset, limit))
        if code == MISSING_EXIT and MISSING_MARK.encode() in err:
            return None
        if code != 0:
            raise TransportError(
                f"cannot read {path} on {self.where}: {err.decode(errors='replace').strip()}"
            )
        return out

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        _, err, code = self._idempotent(write_command(path, mode), data)
        if code != 0:
            raise TransportError(
                f"cannot write {path} on {self.where}: {err.decode(errors='replace').strip()}"
            )

    def start_detached(
        self,
        argv: list[str],
        *,
        cwd: str,
        log_path: str,
        env: dict[str, str] | None = None,
        pid_path: str,
        rc_path: str,
    ) -> int:
        command = start_command(
            argv, cwd=cwd, log_path=log_path, env=env, pid_path=pid_path, rc_path=rc_path
        )
        result = self.run(command, check=False, timeout=60)
        pid = result.stdout.strip()
        if not result.ok or not pid.isdigit():
            raise TransportError(
                f"could not start {argv[0]!r} on {self.where} (no pid in {pid_path}):\n"
                f"{result.tail(10) or pid}",
                hint=f"see {log_path} on the host",
            )
        return int(pid)

    def is_alive(self, pid: int) -> bool:
        _, _, code = self._idempotent(alive_command(pid))
        return code == 0

    # -- transfers ----------------------------------------------------------------------------

    def _remote_spec(self, path: str) -> str:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        return f"{host}:{path}"

    def _rsync(self, argv: list[str], *, pushing: bool) -> TransferStats:
        return rsync.run_rsync(
            argv,
            pushing=pushing,
            where=self.where,
            sleep=self._sleep,
            clock=self._clock,
            before_attempt=self.connect,  # pins the host key before ssh runs; waits out drops
        )

    def _ssh_command(self) -> str:
        return shlex.join(ssh_argv(self.target, connect_timeout=self._connect_timeout))

    def upload(
        self, local: Path, remote: str, *, delete: bool = False, excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
    ) -> TransferStats:
        local = Path(local)
        if not local.exists():
            raise TransportError(f"nothing to upload: {local} does not exist")
        if delete:
            remote = rsync.check_delete_target(remote)
        is_dir = local.is_dir()
        parent = remote if is_dir else (remote.rsplit("/", 1)[0] or "/")
        # the remote rsync is started by a shell: create the destination there, saving a round trip
        rsync_path = f"mkdir -p -- {shlex.quote(parent)} && rsync"
        argv = rsync.rsync_argv(
            f"{local}/" if is_dir else str(local),
            self._remote_spec(remote.rstrip("/") + "/" if is_dir else remote),
            ssh_command=self._ssh_command(),
            delete=delete,
            excludes=excludes,
            filters=filters,
            extra=(f"--rsync-path={rsync_path}", *self._rsync_args),
        )
        return self._rsync(argv, pushing=True)

    def download(
        self, remote: str, local: Path, *, includes: Sequence[str] | None = None,
        max_bytes: int | None = None,
    ) -> TransferStats:
        local = Path(local)
        if includes is not None:
            # a directory by contract: no probe round trip; a missing one fails inside rsync
            local.mkdir(parents=True, exist_ok=True)
            argv = rsync.rsync_argv(
                self._remote_spec(remote.rstrip("/") + "/"),
                str(local),
                ssh_command=self._ssh_command(),
                includes=includes,
                extra=self._rsync_args,
                incoming=True,
                max_bytes=max_bytes,
            )
            return self._rsync(argv, pushing=False)
        quoted = shlex.quote(remote)
        probe = f"if [ -d {quoted} ]; then echo dir; elif [ -e {quoted} ]; then echo file; fi"
        out, err, code = self._idempotent(probe)
        if code != 0:
            raise TransportError(
                f"cannot look at {remote} on {self.where}: {err.decode(errors='replace').strip()}"
            )
        kind = out.decode(errors="replace").strip() or "none"
        if kind == "none":
            raise TransportError(f"nothing to download: {remote} does not exist on {self.where}")
        (local if kind == "dir" else local.parent).mkdir(parents=True, exist_ok=True)
        argv = rsync.rsync_argv(
            self._remote_spec(remote.rstrip("/") + "/" if kind == "dir" else remote),
            str(local),
            ssh_command=self._ssh_command(),
            extra=self._rsync_args,
            incoming=True,
            max_bytes=max_bytes,
        )
        return self._rsync(argv, pushing=False)


def _retryable_ssh_errors() -> type[Exception]:
    """paramiko's negotiation failures (banner, kex) that a retry may cure; auth and key are not."""
    import paramiko

    return paramiko.SSHException


def _feed(channel: paramiko.Channel, data: bytes | None) -> None:
    """Send stdin on its own thread so a command that prints a lot cannot deadlock against us."""
    try:
        if data:
            channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError):
        return  # the channel is gone; the reader sees why


def _collect(channel: paramiko.Channel, timeout: float | None) -> tuple[bytes, bytes, int | None]:
    """Read stdout and stderr until the channel ends. Returns code None on timeout, -1 when the
    channel ended without an exit status (connection lost).

    sshd sends the exit status as soon as the command exits, possibly before the last output
    (still held back by the window): the end is EOF *and* status, or the channel closing.
    """
    out, err = bytearray(), bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout

    def drain() -> None:
        while channel.recv_ready():
            out.extend(channel.recv(65536))
        while channel.recv_stderr_ready():
            err.extend(channel.recv_stderr(65536))

    while True:
        drain()
        finished = channel.exit_status_ready() and channel.eof_received
        if finished or channel.closed or not channel.get_transport().is_active():
            drain()
            code = channel.recv_exit_status() if channel.exit_status_ready() else -1
            return bytes(out), bytes(err), code
        if deadline is not None and time.monotonic() > deadline:
            return bytes(out), bytes(err), None
        select.select([channel], [], [], 0.05)
