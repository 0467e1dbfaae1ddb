"""``LocalHost``: the Host interface on this machine (the ``local`` provider and tests).

Commands run from argv lists; ``run`` hands its command line to ``sh -c`` exactly like sshd hands
it to the login shell, so callers build the same quoted command for both hosts. Files are read and
written with Python; transfers use the local rsync binary (same resume and skip behaviour).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from controller.errors import TransportError
from controller.hosts import rsync
from controller.hosts.base import CommandFailed, CommandResult
from controller.hosts.rsync import TransferStats
from controller.hosts.shell import detached_script


def process_alive(pid: int) -> bool:
    """True when ``pid`` runs here and is not a zombie (zombies are only visible with /proc)."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(") ", 1)[-1][:1] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class LocalHost:
    """This machine as a Host. ``sleep``/``clock`` are only used by rsync retries."""

    where = "localhost"

    def __init__(
        self,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rsync_args: Sequence[str] = (),
    ) -> None:
        self._sleep = sleep
        self._clock = clock
        self._rsync_args = tuple(rsync_args)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        # its own process group, so a timeout ends the whole pipeline, not just ``sh``
        proc = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(stdin if stdin is not None else b"", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TransportError(f"command on {self.where} timed out after {timeout} s") from exc
        result = CommandResult(
            command=command,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            exited=proc.returncode,
        )
        if check and not result.ok:
            raise CommandFailed(result, where=self.where)
        return result

    def read_bytes(self, path: str, offset: int = 0, limit: int | None = None) -> bytes | None:
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must not be negative")
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read() if limit is None else fh.read(limit)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc}") from exc

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.flux-remote.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise TransportError(f"cannot write {path}: {exc}") from exc

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
        script = detached_script(argv, cwd=cwd, env=env, pid_path=pid_path, rc_path=rc_path)
        try:
            for stale in (pid_path, rc_path):
                Path(stale).unlink(missing_ok=True)
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:
                child = subprocess.Popen(
                    ["sh", "-c", script],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # setsid(): survives the controller and its terminal
                    close_fds=True,
                )
        except OSError as exc:
            raise TransportError(f"cannot start {argv[0]!r} on {self.where}: {exc}") from exc
        self._children[child.pid] = child
        return child.pid

    def is_alive(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None  # also reaps it, so it never lingers as a zombie
        return process_alive(pid)

    def upload(
        self, local: Path, remote: str, *, delete: bool = False, excludes: Sequence[str] = (),
        filters: Sequence[str] = (),
    ) -> TransferStats:
        local = Path(local)
        if delete:
            remote = rsync.check_delete_target(remote)
        source = f"{local}/" if local.is_dir() else str(local)
        if local.is_dir():
            Path(remote).mkdir(parents=True, exist_ok=True)
        else:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
        argv = rsync.rsync_argv(
            source, remote, delete=delete, excludes=excludes, extra=self._rsync_args,
            filters=filters,
        )
        return rsync.run_rsync(
            argv, pushing=True, where=self.where, sleep=self._sleep, clock=self._clock
        )

    def download(
        self, remote: str, local: Path, *, includes: Sequence[str] | None = None,
        max_bytes: int | None = None,
    ) -> TransferStats:
        local = Path(local)
        is_dir = Path(remote).is_dir()
        if not Path(remote).exists():
            raise TransportError(f"nothing to download: {remote} does not exist on {self.where}")
        if includes is not None and not is_dir:
            raise TransportError(f"cannot pick entries out of {remote}: not a directory")
        (local if is_dir else local.parent).mkdir(parents=True, exist_ok=True)
        source = f"{remote.rstrip('/')}/" if is_dir else remote
        argv = rsync.rsync_argv(source, str(local), includes=includes, extra=self._rsync_args,
                                incoming=True, max_bytes=max_bytes)
        return rsync.run_rsync(
            argv, pushing=True, where=self.where, sleep=self._sleep, clock=self._clock
        )

    def close(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]
