"""The Provider interface: where a run's agent gets a machine, and how that machine is let go.

The launch code (``controller.run.orchestrator``) is the same for every provider; only these few calls
differ. ``vast`` rents and destroys instances; ``ssh`` uses a host the user already has; ``local``
runs the agent on this machine. Every call that costs money is journaled by the provider itself:
an intent row before, the result after (``controller.journal``).

Test doubles implement the same protocol as a small in-memory class; nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from controller.hosts.base import Host
    from controller.journal import Journal
    from controller.spec.model import RunSpec

Notify = Callable[[str, str], None]
"""``notify(state, message)``: a provider reports progress; ``state`` is a run state or ""."""


@dataclass
class Estimate:
    """What a run is expected to cost on this provider, decided before anything is rented."""

    provider: str
    price_per_hour: float  # $/h of the chosen machine (dph_total on Vast), 0 when free
    est_usd: float | None  # None when the provider cannot know (own hardware, unknown speed)
    est_hours: float | None
    gpu_name: str | None = None
    plan: Any = None  # controller.planning.planner.PlanResult for vast (the plan table), else None
    notes: list[str] = field(default_factory=list)
    # > 1: one seat of a multi-GPU instance rented for that many runs at once
    # (controller.planning.packing); price_per_hour and est_usd are the seat's share
    seats: int = 1

    @classmethod
    def from_plan(cls, plan: Any, provider: str = "vast") -> "Estimate":
        """The estimate of a planner result's chosen offer (``controller.planning.planner``)."""
        chosen = plan.chosen
        return cls(provider=provider, price_per_hour=chosen.dph_total, est_usd=chosen.est_usd,
                   est_hours=chosen.est_hours, gpu_name=chosen.gpu_name, plan=plan)

    def to_dict(self) -> dict[str, Any]:
        data = {"provider": self.provider, "price_per_hour": self.price_per_hour,
                "est_usd": self.est_usd, "est_hours": self.est_hours, "gpu_name": self.gpu_name,
                "notes": list(self.notes), **({"seats": self.seats} if self.seats > 1 else {})}
        if self.plan is not None and hasattr(self.plan, "to_dict"):
            data["plan"] = self.plan.to_dict()
        return data


@dataclass
class Machine:
    """A machine ready to take the agent: a connected host plus what billing needs to know."""

    host: Host
    root: str  # run dirs live in <root>/<run_id>/
    python: str  # the interpreter that runs ``python -m remote``
    price_per_hour: float
    billing_started_at: float
    instance_row: int  # the journal's instances row for this machine
    info: dict[str, Any] = field(default_factory=dict)  # plan.json's "instance" block


class Provider(Protocol):
    """One backend. Calls block until done; all of them may raise ``FluxRemoteError`` subclasses."""

    name: str

    def estimate(self, spec: RunSpec) -> Estimate:
        """Price the run. No side effects; raises ``BudgetError`` when nothing fits the budget."""
        ...

    def acquire(self, run_id: str, spec: RunSpec, estimate: Estimate, journal: Journal,
                notify: Notify) -> Machine:
        """Rent / reach a machine and wait until a command runs on it.

        Journals every rent (intent, then result). A machine that misses a readiness deadline is
        destroyed (journaled) before the next offer is tried. Raises ``ProviderError`` when no
        offer works; then nothing this call rented is left alive.
        """
        ...

    def reattach(self, run_id: str, spec: RunSpec, journal: Journal) -> Machine:
        """Reconnect to the run's live machine after the controller died (no renting).

        Raises ``RunError`` when the journal has no live machine for the run, ``ProviderError``
        when the provider says it is gone.
        """
        ...

    def release(self, run_id: str, journal: Journal, *, keep_data: bool = False) -> None:
        """Let the run's machine go: destroy it (or stop it when ``keep_data``), journaled and
        confirmed. Idempotent: releasing an already released machine does nothing."""
        ...

    def stop_machine(self, run_id: str, journal: Journal) -> None:
        """Stop the whole shared multi-GPU instance the run sits on (its agent ignored STOP),
        whoever else is on it; journaled. Asked only of a provider that rents shared instances
        (``vast``: rows with a seat)."""
        ...

    def hand_over(self, run_id: str, to_run_id: str, journal: Journal) -> int:
        """Give the run's live machine to ``to_run_id`` (a batch's next run): nothing is destroyed
        or rented; the journal moves the instance to the new run in one transaction
        (``Journal.hand_over_instance``). Returns the new instances row."""
        ...

    def health(self, run_id: str, journal: Journal) -> str | None:
        """Why the run's machine cannot come back (gone, exited, outbid), or None when the provider
        sees nothing wrong. Asked only after the connection failed; one cheap call, journals a
        machine it finds gone. Own hardware always answers None (we cannot tell)."""
        ...

    def reconcile(self, journal: Journal) -> list[str]:
        """Resolve intents without results (a crash in between) by asking the provider.

        Never creates anything. Returns one human line per row it changed.
        """
        ...

    def orphans(self, journal: Journal) -> list[dict[str, Any]]:
        """Instances labelled ``flux-remote:`` that no live run owns (for ``gc``)."""
        ...

    def destroy_orphan(self, instance: dict[str, Any], journal: Journal) -> None:
        """Destroy one instance from :meth:`orphans` (journaled, confirmed)."""
        ...


def own_machine_estimate(provider: str, spec: "RunSpec") -> Estimate:
    """Own hardware (``ssh``, ``local``): free unless the spec prices it; hours are unknown."""
    price = spec.provider.price_per_hour
    notes = [] if price else ["own hardware: no rental cost"]
    return Estimate(provider=provider, price_per_hour=price, est_usd=0.0 if not price else None,
                    est_hours=None, notes=notes)


def claim_own_machine(journal: "Journal", run_id: str, *, provider: str, name: str,
                      price_per_hour: float, clock: Callable[[], float]) -> tuple[int, float]:
    """Journal the use of own hardware like a rental (so spend meters the same way).

    Returns ``(row id, billing start)``; reuses the run's live row when there is one.
    """
    current = journal.current_instance(run_id)
    if current is not None:
        return int(current["id"]), float(current["billing_started_at"] or clock())
    row = journal.instance_intent(run_id, provider=provider, label=name, dph_total=price_per_hour)
    started = clock()
    journal.instance_created(row, name, billing_started_at=started)
    return row, started


def own_machine_row(journal: "Journal", run_id: str) -> tuple[int, float]:
    """The run's open row on own hardware (for ``reattach``); RunError when it was released."""
    from controller.errors import RunError

    current = journal.current_instance(run_id)
    if current is None:
        raise RunError(f"run {run_id} no longer holds its machine",
                       hint="what was fetched is in the run's out dir (`flux-remote status`)")
    return int(current["id"]), float(current["billing_started_at"] or 0.0)


def release_own_machine(journal: "Journal", run_id: str) -> None:
    """Own hardware is never destroyed: the row is closed so that nothing meters any more."""
    current = journal.current_instance(run_id)
    if current is not None:
        journal.destroy_intent(int(current["id"]))
        journal.instance_destroyed(int(current["id"]))


class OwnMachineProvider:
    """What ``local`` and ``ssh`` share: hardware the user owns is never rented or destroyed,
    has no provider-side state to reconcile, and can leave no orphan behind."""

    def release(self, run_id: str, journal: "Journal", *, keep_data: bool = False) -> None:
        release_own_machine(journal, run_id)

    def hand_over(self, run_id: str, to_run_id: str, journal: "Journal") -> int:
        from controller.errors import RunError

        current = journal.current_instance(run_id)
        if current is None:
            raise RunError(f"run {run_id} holds no machine to hand over")
        return journal.hand_over_instance(int(current["id"]), to_run_id)

    def health(self, run_id: str, journal: "Journal") -> str | None:
        return None

    def reconcile(self, journal: "Journal") -> list[str]:
        return []

    def orphans(self, journal: "Journal") -> list[dict[str, Any]]:
        return []

    def destroy_orphan(self, instance: dict[str, Any], journal: "Journal") -> None:
        return None
