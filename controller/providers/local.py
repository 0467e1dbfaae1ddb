"""``local``: the agent runs on this machine, started detached exactly as on a remote host.

Run dirs live under the state dir (``<state_dir>/local/<run_id>/``) unless the spec sets
``provider.remote_root``; the interpreter is this one unless it sets ``provider.remote_python``.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable

from controller.providers.base import (Estimate, Machine, Notify, OwnMachineProvider,
                                       claim_own_machine, own_machine_estimate,
                                       own_machine_row)

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.spec.model import RunSpec


def _is_default(spec: "RunSpec", name: str) -> bool:
    """Whether the spec leaves ``provider.<name>`` at its default (meant for remote hosts)."""
    return getattr(spec.provider, name) == type(spec.provider).model_fields[name].default


def local_root(spec: "RunSpec") -> str:
    if not _is_default(spec, "remote_root"):
        return spec.provider.remote_root
    from controller.state import state_dir

    return str(state_dir() / "local")


def local_python(spec: "RunSpec") -> str:
    if not _is_default(spec, "remote_python"):
        return spec.provider.remote_python
    return sys.executable


class LocalProvider(OwnMachineProvider):
    name = "local"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def estimate(self, spec: "RunSpec") -> Estimate:
        return own_machine_estimate(self.name, spec)

    def _machine(self, spec: "RunSpec", row: int, started: float) -> Machine:
        from controller.hosts.local import LocalHost

        return Machine(host=LocalHost(), root=local_root(spec), python=local_python(spec),
                       price_per_hour=spec.provider.price_per_hour, billing_started_at=started,
                       instance_row=row, info={"gpu_name": None, "num_gpus": 0, "host": "local"})

    def acquire(self, run_id: str, spec: "RunSpec", estimate: Estimate, journal: "Journal",
                notify: Notify) -> Machine:
        row, started = claim_own_machine(journal, run_id, provider=self.name, name="localhost",
                                         price_per_hour=spec.provider.price_per_hour,
                                         clock=self.clock)
        return self._machine(spec, row, started)

    def reattach(self, run_id: str, spec: "RunSpec", journal: "Journal") -> Machine:
        return self._machine(spec, *own_machine_row(journal, run_id))
