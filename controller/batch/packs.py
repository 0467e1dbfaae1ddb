"""Several runs at once on one multi-GPU instance, as a batch runs them.

:func:`controller.planning.packing.choose_pack` says whether an N-GPU offer is cheaper per run
than an instance each; :class:`Packs` acts on it for the batch scheduler: it chooses the pack
when a slot would start a new machine and the ledger holds the whole pack, reserves the
machine's idle seats, opens the other seats to pending runs of the same machine key once the
first run is past its setup (:func:`controller.batch.seats.past_setup`), meters the idle seats
into the ledger, and tells the scheduler which seats are promised (pending runs of that key wait
for them) and which instances are alive (``max_parallel`` counts machines). The scheduler keeps
the runs: their claims, their threads, and the handover of a seat a run let go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from controller.batch import seats as S
from controller.batch.ledger import run_reservation
from controller.batch.setup import slot_spec
from controller.batch.stop import stop_reason
from controller.errors import FluxRemoteError
from controller.journal import INSTANCE_LIVE, seat_of
from controller.planning.reuse import machine_key
from controller.run import states as R

if TYPE_CHECKING:
    from controller.batch.board import BatchBoard
    from controller.batch.ledger import Ledger
    from controller.journal import Journal
    from controller.planning.packing import Pack
    from controller.providers.base import Estimate, Provider
    from controller.providers.vast import OfferClaims
    from controller.spec.model import RunSpec


class Runs(Protocol):
    """What packs need of the batch's scheduler: its ledger and journal, and its slots."""

    batch: dict[str, Any]
    batch_id: str
    journal: "Journal"
    ledger: "Ledger"
    board: "BatchBoard"
    claims: "OfferClaims"
    provider_factory: Callable[[str, "OfferClaims"], "Provider"]
    clock: Callable[[], float]

    def pending(self) -> list[dict[str, Any]]: ...

    def claim(self, slot: dict[str, Any], spec: "RunSpec", estimate: "Estimate",
              provider: "Provider") -> str | None: ...

    def spawn(self, slot: dict[str, Any], run_id: str, estimate: "Estimate | None",
              provider: "Provider | None" = None) -> None: ...

    def unclaim(self, slot: dict[str, Any], run_id: str, error: str) -> None: ...


@dataclass
class SharedMachine:
    """A pack started in this process: its first run, its machine key and its seats."""

    lead: str
    key: str
    pack: "Pack"
    instance_id: str | None = None
    filled: set[int] = field(default_factory=set)  # seats 1..N-1 that got a run

    @property
    def unopened(self) -> int:
        return self.pack.seats - 1 - len(self.filled)

    def free_seats(self) -> list[int]:
        return [seat for seat in range(1, self.pack.seats) if seat not in self.filled]


class Packs:
    """The batch's packs (first run -> :class:`SharedMachine`), driven by its scheduler."""

    def __init__(self, sched: Runs) -> None:
        self.sched = sched
        self.journal = sched.journal
        self.shared: dict[str, SharedMachine] = {}

    def promised(self) -> dict[str, int]:
        """Per machine key, the seats of packs not open yet (their first run is setting up)."""
        promised: dict[str, int] = {}
        for machine in self.shared.values():
            run = self.journal.get_run(machine.lead) or {}
            if run.get("state") in R.ACTIVE_STATES and machine.unopened > 0:
                promised[machine.key] = promised.get(machine.key, 0) + machine.unopened
        return promised

    def instances_alive(self) -> set[str]:
        """``instance:<id>`` of every pack's instance that has a seat alive."""
        return {f"instance:{m.instance_id}" for m in self.shared.values()
                if m.instance_id and S.alive(S.seat_rows(self.journal, m.instance_id))}

    def choose(self, spec: "RunSpec", single: "Estimate", provider: "Provider") -> "Pack | None":
        """An N-GPU offer for a slot and N-1 more pending runs of its key, when that is
        cheaper per run than an instance each and the ledger holds the whole pack
        (``controller.planning.packing``); None: the slot starts on its own machine."""
        from controller.planning.packing import PACK_SIZES, can_pack, choose_pack, pack_spec

        batch = self.sched.batch
        most = int(batch.get("gpus_per_machine") or 1)
        if most < 2 or not batch.get("reuse_machines") or not can_pack(spec):
            return None
        key = machine_key(spec)
        same = sum(1 for s in self.sched.pending() if machine_key(slot_spec(s)) == key)
        machines: dict[int, "Estimate"] = {}
        for seats in PACK_SIZES:
            if seats > min(same, most):
                break
            try:
                machines[seats] = provider.estimate(pack_spec(spec, seats))
            except FluxRemoteError:
                continue  # no such offer fits
        pack = choose_pack(single, machines)
        if pack is None:
            return None
        return pack if self.sched.ledger.fits(
            pack.total_reserve(lambda estimate: run_reservation(estimate, spec))) else None

    def start(self, run_id: str, spec: "RunSpec", pack: "Pack") -> None:
        """The claimed first run of a pack: reserve the machine's idle seats, remember it."""
        key = S.idle_key(run_id)
        self.sched.ledger.try_reserve(key, pack.idle_usd)  # fits: choose checked the whole pack
        self.journal.add_event(run_id, S.IDLE_RESERVE, {
            "batch_id": self.sched.batch_id, "reserved_usd": pack.idle_usd,
            "seats": pack.seats})
        self.shared[run_id] = SharedMachine(lead=run_id, key=machine_key(spec), pack=pack)
        self.sched.board.note(self.journal.get_run(run_id)["name"],
                              f"rents a {pack.seats}-GPU instance for {pack.seats} runs at once "
                              f"(${pack.per_run_usd():.2f} per run)")

    def open_seats(self) -> None:
        """Put pending runs on the free seats of packs whose first run is past its setup."""
        for machine in list(self.shared.values()):
            if not machine.free_seats():
                continue
            if machine.instance_id is None:
                row = self.journal.current_instance(machine.lead)
                if row is None or not row.get("instance_id") or not seat_of(row):
                    continue  # not rented yet
                machine.instance_id = str(row["instance_id"])
                self.journal.add_event(machine.lead, S.IDLE_RESERVE, {
                    "batch_id": self.sched.batch_id, "reserved_usd": machine.pack.idle_usd,
                    "seats": machine.pack.seats, "instance_id": machine.instance_id})
            # any live seat anchors the new one (the first run may have handed seat 0 on)
            live = [r for r in S.seat_rows(self.journal, machine.instance_id)
                    if r["state"] == INSTANCE_LIVE]
            if not live or not S.past_setup(self.journal, machine.lead):
                continue
            row = live[0]
            if stop_reason(self.journal, self.sched.batch_id) is not None:
                machine.filled.update(machine.free_seats())
                continue
            for seat in machine.free_seats():
                if not self._fill(machine, int(row["id"]), seat):
                    break

    def _fill(self, machine: "SharedMachine", lead_row: int, seat: int) -> bool:
        """The first pending slot of the machine's key whose warm seat fits takes ``seat``."""
        sched = self.sched
        run = self.journal.get_run(machine.lead) or {}
        provider = sched.provider_factory(run.get("provider") or "vast", sched.claims)
        candidates = [s for s in sched.pending() if machine_key(slot_spec(s)) == machine.key]
        if not candidates:
            machine.filled.update(machine.free_seats())  # nobody left to take them
            return False
        for slot in candidates:
            spec = slot_spec(slot)
            run_id = sched.claim(slot, spec, machine.pack.warm, provider)
            if run_id is None:
                continue
            try:
                self.journal.open_seat(lead_row, run_id, seat)
            except ValueError as exc:
                sched.unclaim(slot, run_id, f"could not take a seat on the machine: {exc}")
                machine.filled.add(seat)
                return False
            machine.filled.add(seat)
            sched.board.note(slot["name"], f"takes GPU {seat} of the instance of {run['name']} "
                                           f"(already set up)")
            sched.spawn({**slot, "attempts": int(slot["attempts"]) + 1}, run_id,
                         machine.pack.warm, provider)
            return True
        return False  # none fits now: tried again next round

    def meter_idle(self) -> None:
        """The idle seats of each pack into the ledger (packs of an earlier process too, after
        ``resume``); an entry is closed once its machine is gone."""
        ledger = self.sched.ledger
        for key in ledger.open_keys(S.IDLE_PREFIX):
            lead = key[len(S.IDLE_PREFIX):]
            machine = self.shared.get(lead)
            instance_id = machine.instance_id if machine else S.journaled_instance(
                self.journal, lead)
            if instance_id is None:
                run = self.journal.get_run(lead) or {}
                if run.get("state") not in R.ACTIVE_STATES:
                    ledger.close(key, 0.0)  # it never got its machine
                continue
            rows = S.seat_rows(self.journal, instance_id)
            idle = S.idle_usd(rows, self.sched.clock())
            if S.alive(rows):
                ledger.meter(key, idle)
            else:
                ledger.close(key, idle)
                self.journal.add_event(lead, "idle_seats", {
                    "batch_id": self.sched.batch_id, "instance_id": instance_id, "usd": idle})
