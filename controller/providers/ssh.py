"""``ssh``: a host the user already has (their own GPU box, a university machine).

Nothing is rented; the run costs ``provider.price_per_hour`` if the spec gives one. The host key
is pinned on first contact into the state dir's known_hosts (``controller.hosts.ssh``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from controller.errors import TransportError
from controller.providers.base import (Estimate, Machine, Notify, OwnMachineProvider,
                                       claim_own_machine, own_machine_estimate,
                                       own_machine_row)

if TYPE_CHECKING:
    from controller.hosts.base import Host
    from controller.journal import Journal
    from controller.spec.model import RunSpec


def default_key_path() -> Path | None:
    """The first of the user's usual private keys that exists (ssh's own default order)."""
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        path = Path.home() / ".ssh" / name
        if path.exists():
            return path
    return None


class SshProvider(OwnMachineProvider):
    name = "ssh"

    def __init__(self, *, known_hosts_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.known_hosts_path = known_hosts_path
        self.clock = clock

    def estimate(self, spec: "RunSpec") -> Estimate:
        return own_machine_estimate(self.name, spec)

    def connect(self, spec: "RunSpec") -> "Host":
        from controller.hosts.ssh import SshHost, SshTarget
        from controller.state import known_hosts_path

        prov = spec.provider
        key = prov.key_path or default_key_path()
        if key is None:
            raise TransportError(f"no SSH key for {prov.user}@{prov.host}",
                                 hint="set provider.key_path in the spec")
        target = SshTarget(host=str(prov.host), port=prov.port, user=prov.user,
                           key_path=Path(key).expanduser(),
                           known_hosts_path=self.known_hosts_path or known_hosts_path())
        return SshHost(target)

    def acquire(self, run_id: str, spec: "RunSpec", estimate: Estimate, journal: "Journal",
                notify: Notify) -> Machine:
        prov = spec.provider
        notify("booting", f"connecting to {prov.user}@{prov.host}:{prov.port}")
        host = self.connect(spec)
        host.run("true", timeout=60)
        row, started = claim_own_machine(journal, run_id, provider=self.name,
                                         name=f"{prov.host}:{prov.port}",
                                         price_per_hour=prov.price_per_hour, clock=self.clock)
        return self._machine(spec, host, row, started)

    def _machine(self, spec: "RunSpec", host: "Host", row: int, started: float) -> Machine:
        prov = spec.provider
        return Machine(host=host, root=prov.remote_root, python=prov.remote_python,
                       price_per_hour=prov.price_per_hour, billing_started_at=started,
                       instance_row=row, info={"host": prov.host, "gpu_name": None, "num_gpus": 1})

    def reattach(self, run_id: str, spec: "RunSpec", journal: "Journal") -> Machine:
        row, started = own_machine_row(journal, run_id)
        return self._machine(spec, self.connect(spec), row, started)
