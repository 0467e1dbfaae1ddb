"""POSIX shell command lines that both hosts run, every argument quoted with ``shlex.quote``.

They only assume ``sh``, coreutils (``tail``, ``head``, ``cat``, ``mv``) and ``setsid``: what a bare
``pytorch/pytorch`` image has. A file name such as ``$(touch pwned)`` stays a file name.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from typing import Mapping, Sequence

MISSING_EXIT = 3  # read_command: "no such file" (distinct from tail/head failures)
MISSING_MARK = "flux-remote: no such file"
PID_WAIT_TICKS = 200  # start_command waits up to 200 x 50 ms for the pid file

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
q = shlex.quote


def read_command(path: str, offset: int = 0, limit: int | None = None) -> str:
    """Print ``path`` from byte ``offset`` (``tail -c +N`` seeks, nothing before it is read)."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must not be negative")
    command = (
        f"if [ ! -f {q(path)} ]; then echo {q(MISSING_MARK)} >&2; exit {MISSING_EXIT}; fi; "
        f"tail -c +{offset + 1} -- {q(path)}"
    )
    if limit is not None:
        command += f" | head -c {limit}"
    return command


def write_command(path: str, mode: int) -> str:
    """Read stdin into a private temp file beside ``path``, set ``mode``, rename over ``path``."""
    parent = posixpath.dirname(path) or "."
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.flux-remote.tmp")
    return (
        f"mkdir -p -- {q(parent)} && umask 077 && "
        f"{{ cat > {q(tmp)} && chmod {mode:o} -- {q(tmp)} && mv -f -- {q(tmp)} {q(path)}; }} "
        f"|| {{ rc=$?; rm -f -- {q(tmp)}; exit $rc; }}"
    )


def alive_command(pid: int) -> str:
    """Exit 0 when ``pid`` runs and is not a zombie (containers often lack a reaping init)."""
    pid = int(pid)
    return (
        f"if [ -r /proc/{pid}/stat ]; then "
        f's=$(sed -e \'s/.*) //\' /proc/{pid}/stat | cut -c1); [ "$s" != Z ] && [ "$s" != X ]; '
        f"else kill -0 {pid} 2>/dev/null; fi"
    )


def detached_script(
    argv: Sequence[str], *, cwd: str, env: Mapping[str, str] | None, pid_path: str, rc_path: str
) -> str:
    """The script the session leader runs: record its pid, run ``argv`` in ``cwd``, record the
    exit code. Both records are written to a temp name and renamed, so readers never see half."""
    if not argv:
        raise ValueError("start_detached needs a command")
    assignments = []
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        assignments.append(q(f"{name}={value}"))
    command = " ".join(q(arg) for arg in argv)
    if assignments:
        command = f"env {' '.join(assignments)} {command}"
    return (
        f"echo $$ > {q(pid_path + '.tmp')} && mv -f -- {q(pid_path + '.tmp')} {q(pid_path)}; "
        f"cd {q(cwd)} && {command}; "
        f"echo $? > {q(rc_path + '.tmp')}; mv -f -- {q(rc_path + '.tmp')} {q(rc_path)}"
    )


def start_command(
    argv: Sequence[str],
    *,
    cwd: str,
    log_path: str,
    env: Mapping[str, str] | None,
    pid_path: str,
    rc_path: str,
) -> str:
    """Start ``detached_script`` under ``setsid`` in the background, then print its pid.

    ``setsid`` gives the process its own session (no controlling tty, no SIGHUP when the SSH
    connection goes); stdin is /dev/null and output is appended to ``log_path``, so nothing ties
    it to the channel that started it.
    """
    script = detached_script(argv, cwd=cwd, env=env, pid_path=pid_path, rc_path=rc_path)
    log_dir = posixpath.dirname(log_path) or "."
    return (
        f"rm -f -- {q(pid_path)} {q(rc_path)} && mkdir -p -- {q(log_dir)} && "
        f"(setsid sh -c {q(script)} < /dev/null >> {q(log_path)} 2>&1 &) && "
        f"i=0; while [ ! -s {q(pid_path)} ] && [ $i -lt {PID_WAIT_TICKS} ]; do "
        f"sleep 0.05; i=$((i+1)); done; cat -- {q(pid_path)}"
    )
