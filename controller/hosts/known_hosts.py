"""Pinned SSH host keys: one OpenSSH-format ``known_hosts`` that paramiko and ``ssh`` both read.

The first contact with a host:port writes its key (trust on first use; atomically, under a lock
so that parallel runs do not lose each other's pins). A different key later raises
HostKeyError, and the pin stays. A newly rented instance that reuses an address legitimately
has a new key: :func:`replace_host_key` is for that moment only, never for a failed check.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from controller.errors import HostKeyError
from controller.state import write_text_atomic

if TYPE_CHECKING:
    import paramiko


def host_key_name(host: str, port: int) -> str:
    """How OpenSSH and paramiko name a host: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


@contextlib.contextmanager
def _locked(known_hosts: Path) -> Iterator[None]:
    """Serialise read-modify-write of known_hosts between controller processes."""
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; pins are still written atomically
        yield
        return
    with open(known_hosts.with_name(known_hosts.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pinned_keys(known_hosts: Path, name: str) -> dict[str, Any]:
    """key type -> pinned key for ``name`` (empty when the host was never seen)."""
    import paramiko

    if not known_hosts.exists():
        return {}
    keys = paramiko.HostKeys(str(known_hosts)).lookup(name)
    return dict(keys) if keys is not None else {}


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def pin_host_key(known_hosts: Path, host: str, port: int, key: paramiko.PKey) -> bool:
    """Check ``key`` against the pin for host:port, pinning it if there is none.

    Returns True when a new pin was written. Raises HostKeyError when a different key is pinned.
    """
    name = host_key_name(host, port)
    with _locked(known_hosts):
        pinned = pinned_keys(known_hosts, name)
        if not pinned:
            old = known_hosts.read_text(encoding="utf-8") if known_hosts.exists() else ""
            if old and not old.endswith("\n"):
                old += "\n"
            line = f"{name} {key.get_name()} {key.get_base64()}\n"
            write_text_atomic(known_hosts, old + line, mode=0o600)
            return True
    same = pinned.get(key.get_name())
    if same is not None and same.asbytes() == key.asbytes():
        return False
    was = ", ".join(_fingerprint(k) for k in pinned.values())
    raise HostKeyError(
        f"the host key of {name} has changed: it now offers {_fingerprint(key)} but "
        f"{known_hosts} pins {was}. This can mean someone is intercepting the connection; "
        "nothing was sent.",
        hint=(
            "if the machine was legitimately replaced or reinstalled, remove the stale entry: "
            f"ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(known_hosts))}"
        ),
    )


def replace_host_key(known_hosts: Path, host: str, port: int, key: paramiko.PKey) -> bool:
    """Pin ``key`` for host:port in place of whatever was pinned (a newly rented instance on an
    address Vast handed out before); True when the file changed.

    One locked, atomic rewrite: the pin is never missing in between, so a parallel run whose
    ``ssh``/``rsync`` reads the file meanwhile still finds one. The same key already pinned
    leaves the file as it is."""
    name = host_key_name(host, port)
    with _locked(known_hosts):
        same = pinned_keys(known_hosts, name).get(key.get_name())
        if same is not None and same.asbytes() == key.asbytes():
            return False
        lines = (known_hosts.read_text(encoding="utf-8").splitlines(keepends=True)
                 if known_hosts.exists() else [])
        kept = [line if line.endswith("\n") else line + "\n"
                for line in lines if name not in _names(line)]
        kept.append(f"{name} {key.get_name()} {key.get_base64()}\n")
        write_text_atomic(known_hosts, "".join(kept), mode=0o600)
        return True


def _names(line: str) -> list[str]:
    """The host names a known_hosts line is for (its first field, comma-separated)."""
    fields = line.split(None, 1)
    return fields[0].split(",") if fields and not line.startswith("#") else []
