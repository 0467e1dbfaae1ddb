"""Machines the agent runs on: ``LocalHost`` (this one) and ``SshHost`` (over SSH), one interface.

Imports are lazy so that ``import controller.hosts`` stays cheap for the CLI's start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.hosts.base import CommandFailed, CommandResult, Host
    from controller.hosts.keys import ensure_keypair
    from controller.hosts.local import LocalHost
    from controller.hosts.rsync import TransferStats
    from controller.hosts.ssh import SshHost, SshTarget

__all__ = [
    "CommandFailed",
    "CommandResult",
    "Host",
    "LocalHost",
    "SshHost",
    "SshTarget",
    "TransferStats",
    "ensure_keypair",
]

_WHERE = {
    "CommandFailed": "base",
    "CommandResult": "base",
    "Host": "base",
    "LocalHost": "local",
    "SshHost": "ssh",
    "SshTarget": "ssh",
    "TransferStats": "rsync",
    "ensure_keypair": "keys",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'controller.hosts' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"controller.hosts.{_WHERE[name]}"), name)
