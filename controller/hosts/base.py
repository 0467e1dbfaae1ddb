"""The one interface for "a machine where the agent runs", and the value object a command returns.

Two implementations: :class:`controller.hosts.local.LocalHost` (this machine, subprocess + local
rsync) and :class:`controller.hosts.ssh.SshHost` (paramiko over one kept-alive connection, the
rsync binary over the same pinned SSH options). The orchestrator only talks to :class:`Host`.

Every method blocks until its work is done. Every failure is a
:class:`controller.errors.TransportError` (a changed host key: its subclass ``HostKeyError``; a
command that exits non-zero with ``check=True``: :class:`CommandFailed`). Nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from controller.errors import TransportError
from controller.hosts.rsync import TransferStats


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left behind (like invoke's ``Result``)."""

    command: str
    stdout: str
    stderr: str
    exited: int

    @property
    def ok(self) -> bool:
        return self.exited == 0

    def tail(self, n: int = 20, stream: str = "stderr") -> str:
        """The last ``n`` lines of ``stderr`` (or ``stdout``): what an error message shows."""
        text = self.stderr if stream == "stderr" else self.stdout
        return "\n".join(text.rstrip("\n").splitlines()[-n:])


class CommandFailed(TransportError):
    """A command exited non-zero; ``.result`` holds everything it printed."""

    def __init__(self, result: CommandResult, *, where: str) -> None:
        self.result = result
        detail = result.tail(10) or result.tail(10, stream="stdout") or "(no output)"
        super().__init__(f"command on {where} exited {result.exited}:\n{detail}")


@runtime_checkable
class Host(Protocol):
    """A machine that runs commands and holds files. Every method blocks; raises TransportError."""

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run a POSIX shell command line (quote every argument with ``shlex.quote``).

        ``stdin`` is written to the command's standard input, then closed. Not retried: the
        command may have side effects. Raises CommandFailed when ``check`` and the exit is not 0,
        TransportError on timeout (the command is abandoned) or when the connection is lost while
        it runs (the next call reconnects). Without ``timeout`` it may wait for ever: pass one.
        """
        ...

    def read_bytes(self, path: str, offset: int = 0, limit: int | None = None) -> bytes | None:
        """Bytes of ``path`` from ``offset`` (at most ``limit``); None when there is no such file.

        Idempotent (retried after a reconnect). An offset past the end gives ``b""``: a log tail
        reader keeps its offset and asks again.
        """
        ...

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Replace ``path`` atomically with ``data`` (sent over stdin, never on a command line).

        Parent directories are created. The file never exists with wider permissions than
        ``mode`` (0o600 for secrets). Idempotent.
        """
        ...

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
        """Start ``argv`` in its own session (setsid, no pty, stdin /dev/null) and return its pid.

        stdout and stderr are appended to ``log_path``; the pid is written to ``pid_path`` and the
        exit code to ``rc_path`` when the process ends (a stale ``rc_path`` is removed first). The
        process outlives the connection and the caller. ``env`` values are added to the
        environment; they are quoted but visible to ``ps``: secrets go through ``write_bytes``.
        Not idempotent: if the connection drops mid-call, read ``pid_path`` before starting again.
        """
        ...

    def is_alive(self, pid: int) -> bool:
        """Whether ``pid`` is a running (not zombie) process on the host. Idempotent."""
        ...

    def upload(
        self, local: Path, remote: str, *, delete: bool = False, excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
    ) -> TransferStats:
        """rsync ``local`` to ``remote``: a directory's contents into the ``remote`` directory, a
        file to the ``remote`` path. Resumable (``--partial-dir``); unchanged files are not sent.

        ``delete`` removes files under ``remote`` that ``local`` lacks, and is refused (ValueError)
        unless ``remote`` is an absolute path at least two levels deep. Connection-level failures
        are retried with backoff; others raise TransportError with rsync's stderr tail.
        ``filters`` (rsync filter rules, after ``excludes``) narrow what is sent (an include list).
        """
        ...

    def download(
        self, remote: str, local: Path, *, includes: Sequence[str] | None = None,
        max_bytes: int | None = None,
    ) -> TransferStats:
        """rsync ``remote`` (a directory's contents, or one file) to ``local``; like ``upload``.
        Raises TransportError when ``remote`` does not exist.

        The sender is untrusted: only regular files and directories are created, with this
        side's owner and default modes (no links, devices, permissions or owners from it), and a
        file larger than ``max_bytes`` is skipped.

        ``includes`` (names of entries directly in the ``remote`` directory) fetches only those
        entries, a directory among them whole, into the ``local`` directory, in one transfer
        (one connection); a name ``remote`` lacks is skipped, not an error. A name must be one
        path component (ValueError otherwise).
        """
        ...

    def close(self) -> None:
        """Drop the connection (if any). Idempotent; the host can still be used afterwards."""
        ...
