"""The plan of a batch: which run goes on which machine, in what order, for how many dollars.

:func:`schedule_batch` simulates the batch scheduler (``controller.batch.scheduler``) with every
estimate taken as the run's actual duration and cost. The rule it mirrors:

1. Slots are taken in batch order; machines alive at once never exceed ``max_parallel``.
2. When a run ends, its machine goes to the first pending slot with the same
   :func:`~controller.planning.reuse.machine_key` (when ``reuse``) whose
   ``reservation_for(warm estimate)`` (with the cap's finish hold) fits the ledger; that run
   reserves it. When no compatible slot is pending, or none of their warm reservations fits the
   money left, the machine is destroyed.
3. Otherwise a pending slot starts on a new machine when fewer than ``max_parallel`` are alive,
   an offer no live machine of the batch holds still fits its plan (the provider's offer
   claims), and the ledger has room for its cold reservation; with reuse and a machine already
   running, only when what is left after it still covers the other pending runs of its key
   warm (else it waits for that machine: a second setup must not cost runs).
4. Otherwise it waits; a slot that does not fit while nothing runs is skipped (budget).
5. A run that ends gives back its reservation; what it cost (its estimate: cold for the first
   run on a machine, warm for the later ones) stays counted.

Several runs at once on one multi-GPU machine (``gpus_per_machine`` > 1, with ``reuse``; the
pricing and the choice are :mod:`controller.planning.packing`'s):

6. When a pending slot S would start a new machine and ``packing.can_pack`` its spec, each
   N-GPU estimate of its item's ``packs`` with ``2 <= N <= min(pending slots of its key,
   gpus_per_machine)`` (on an offer no live machine holds) is a candidate for
   ``packing.choose_pack`` against S's single cold estimate. When one is chosen and the ledger
   has room for its ``total_reserve``, S starts on seat 0 of that machine reserving the pack's
   ``lead``, and the machine reserves the pack's ``idle_usd``. Otherwise rule 3 as it stands.
7. Once that first run is past the machine's setup, and while it runs, each seat no run has
   taken yet goes to the first pending slot of the key whose reservation of the pack's ``warm``
   fits; none fits: tried again at the next event; none pending: those seats stay empty. Until
   then, as many pending slots of the key as such seats wait for them (they start no machine),
   from the moment the pack starts.
   A seat whose run ends goes to the first pending slot of the key whose own warm estimate on
   that offer, one seat's share, fits (rule 2); else it stays empty. The machine ends when no
   seat holds a run; its idle seat-hours cost ``dph_total / N`` each, counted in its total and
   in the ledger in place of its idle reserve. ``max_parallel`` counts machines, so a pack runs
   N runs in one of them.

So a tight budget gives fewer machines and more runs per machine, and a roomy one up to
``max_parallel`` machines. The same runs priced one instance per run (reuse off, no batch cap)
come with the schedule, so the saving is measured against a baseline computed in the same call.
Pure: no I/O, deterministic for equal inputs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from controller.batch.ledger import FINISH_HOLD_S, Ledger, reservation_for
from controller.planning.packing import PACK_SIZES, Pack, can_pack, choose_pack, seat_estimate
from controller.planning.reuse import machine_key, setup_part, warm_estimate

if TYPE_CHECKING:
    from controller.planning.planner import OfferEstimate
    from controller.providers.base import Estimate
    from controller.spec.model import RunSpec

COLD, WARM = "cold", "warm"
_OPEN, _END = 0, 1  # event kinds: a machine's first run past its setup; a run's end


@dataclass(frozen=True)
class ScheduleItem:
    """One slot of the batch: its spec and its estimate on a fresh machine, or why there is
    none (the provider's ``BudgetError`` message). ``packs``: N -> the estimate of a whole N-GPU
    machine for it (``packing.pack_spec``); an N missing: no such offer fits."""

    name: str
    spec: "RunSpec"
    estimate: "Estimate | None" = None
    error: str | None = None
    packs: dict[int, "Estimate"] = field(default_factory=dict)


@dataclass
class RunRow:
    """Where and when one run is planned (``machine`` None when it is skipped)."""

    name: str
    machine: int | None = None
    order: int | None = None  # 1 for the run that pays the machine's setup
    seat: int | None = None  # the machine's GPU it trains on (0 on a single-GPU machine)
    start: str | None = None  # COLD | WARM
    est_usd: float | None = None
    est_hours: float | None = None
    reserved_usd: float | None = None
    start_h: float | None = None
    end_h: float | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "machine": self.machine, "order": self.order,
                "seat": self.seat, "start": self.start, "est_usd": _r(self.est_usd),
                "est_hours": _r(self.est_hours),
                "reserved_usd": _r(self.reserved_usd), "start_h": _r(self.start_h),
                "end_h": _r(self.end_h), "skipped": self.skipped}


@dataclass
class MachinePlan:
    """One machine of the schedule: rented for its first run, handed from run to run."""

    index: int
    offer_id: int | None
    gpu_name: str | None
    dph_total: float
    interruptible: bool
    setup_s: float  # paid once, by the first run
    setup_usd: float
    start_h: float
    end_h: float = 0.0
    runs: list[str] = field(default_factory=list)
    est_usd: float = 0.0  # its runs' estimates plus its idle
    num_gpus: int = 1
    seats: int = 1  # runs at once: num_gpus when packed, else 1
    idle_usd: float = 0.0  # the seat-hours without a run, at dph_total / seats

    @property
    def packed(self) -> bool:
        return self.seats > 1

    @property
    def hours(self) -> float:
        return self.end_h - self.start_h

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "offer_id": self.offer_id, "gpu_name": self.gpu_name,
                "dph_total": _r(self.dph_total), "interruptible": self.interruptible,
                "setup_s": _r(self.setup_s, 1), "setup_usd": _r(self.setup_usd),
                "start_h": _r(self.start_h), "end_h": _r(self.end_h), "hours": _r(self.hours),
                "runs": list(self.runs), "est_usd": _r(self.est_usd),
                "num_gpus": self.num_gpus, "seats": self.seats, "idle_usd": _r(self.idle_usd)}


@dataclass
class BatchSchedule:
    """The simulated batch; ``per_run`` is the same runs one instance per run (None inside it)."""

    budget_usd: float
    max_parallel: int
    reuse: bool
    machines: list[MachinePlan]
    runs: list[RunRow]
    per_run: "BatchSchedule | None" = None
    gpus_per_machine: int = 1

    @property
    def total_usd(self) -> float:
        """Every machine's runs and idle seats."""
        return sum(m.est_usd for m in self.machines)

    @property
    def idle_usd(self) -> float:
        return sum(m.idle_usd for m in self.machines)

    @property
    def wall_hours(self) -> float:
        return max((m.end_h for m in self.machines), default=0.0)

    @property
    def machine_hours(self) -> float:
        """Billed instance time: every machine's life summed."""
        return sum(m.hours for m in self.machines)

    @property
    def setups(self) -> int:
        return len(self.machines)

    @property
    def skipped(self) -> list[RunRow]:
        return [row for row in self.runs if row.skipped is not None]

    @property
    def fits(self) -> bool:
        return not self.skipped and self.total_usd <= self.budget_usd + 1e-9

    @property
    def saving_usd(self) -> float | None:
        return None if self.per_run is None else self.per_run.total_usd - self.total_usd

    def refusal(self) -> str:
        """Why the batch does not fit ("" when it does)."""
        if self.fits:
            return ""
        parts = [f"{row.name}: {row.skipped}" for row in self.skipped]
        return (f"{len(self.skipped)} of {len(self.runs)} runs do not fit the batch budget "
                f"${self.budget_usd:.2f}: " + "; ".join(parts))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "budget_usd": self.budget_usd, "max_parallel": self.max_parallel,
            "reuse_machines": self.reuse, "gpus_per_machine": self.gpus_per_machine,
            "fits": self.fits, "total_usd": _r(self.total_usd), "idle_usd": _r(self.idle_usd),
            "wall_hours": _r(self.wall_hours), "machine_hours": _r(self.machine_hours),
            "setups": self.setups, "machines": [m.to_dict() for m in self.machines],
            "runs": [row.to_dict() for row in self.runs],
            "skipped": [row.name for row in self.skipped]}
        if self.per_run is not None:
            per_run = self.per_run
            data["one_instance_per_run"] = {
                "total_usd": _r(per_run.total_usd), "wall_hours": _r(per_run.wall_hours),
                "machine_hours": _r(per_run.machine_hours), "setups": per_run.setups,
                "machines": [m.to_dict() for m in per_run.machines]}
            data["saving_usd"] = _r(self.saving_usd)
            data["setups_saved"] = per_run.setups - self.setups
        return data


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- one slot's numbers ------------------------------------------------------------------------

@dataclass
class _Slot:
    idx: int
    item: ScheduleItem
    key: str
    row: RunRow
    margin: float

    def reservation(self, estimate: "Estimate") -> float:
        return reservation_for(estimate.est_usd, self.item.spec.budget.max_usd,
                               margin=self.margin,
                               hold_usd=estimate.price_per_hour * FINISH_HOLD_S / 3600.0)


def _on_offer(estimate: "Estimate", offer: "OfferEstimate") -> "Estimate":
    """``estimate`` as if the planner had chosen ``offer`` (what the provider rents when the
    batch's other machines hold the cheaper offers)."""
    plan = replace(estimate.plan, chosen=offer)
    return replace(estimate, price_per_hour=offer.dph_total, est_usd=offer.est_usd,
                   est_hours=offer.est_hours, gpu_name=offer.gpu_name, plan=plan)


def _offer_identity(estimate: "Estimate") -> tuple[int, bool] | None:
    chosen = getattr(getattr(estimate, "plan", None), "chosen", None)
    return None if chosen is None else (int(chosen.offer_id), bool(chosen.interruptible))


def _on_free_offer(estimate: "Estimate | None",
                   claimed: set[tuple[int, bool]]) -> "Estimate | None":
    """``estimate`` on the cheapest fitting offer of its plan no live machine holds; None when
    every fitting offer is held. Estimates without offers (own hardware) are used as they are."""
    if estimate is None:
        return None
    if getattr(estimate, "plan", None) is None or not hasattr(estimate.plan, "offers"):
        return estimate
    fitting: list["OfferEstimate"] = [o for o in estimate.plan.offers or [] if o.fits]
    for offer in fitting:
        if (int(offer.offer_id), bool(offer.interruptible)) not in claimed:
            return _on_offer(estimate, offer)
    return None


def _cold_estimate(slot: _Slot, claimed: set[tuple[int, bool]]) -> "Estimate | None":
    """The slot's estimate on a fresh machine (:func:`_on_free_offer`)."""
    return _on_free_offer(slot.item.estimate, claimed)


def _warm_on(slot: _Slot, machine_estimate: "Estimate") -> "Estimate":
    """The slot's estimate on the machine another run set up: its own estimate for that offer,
    without the setup."""
    estimate = slot.item.estimate
    identity = _offer_identity(machine_estimate)
    plan = getattr(estimate, "plan", None)
    if estimate is not None and identity is not None and plan is not None:
        for offer in getattr(plan, "offers", None) or []:
            if (int(offer.offer_id), bool(offer.interruptible)) == identity:
                return warm_estimate(_on_offer(estimate, offer))
    return warm_estimate(estimate if estimate is not None else machine_estimate)


def _seat_on(slot: _Slot, machine_estimate: "Estimate", seats: int) -> "Estimate":
    """The slot's estimate for a seat of a packed machine set up by another run: its own
    estimate for that offer (its ``packs``), without the setup, one seat's share."""
    own = slot.item.packs.get(seats)
    identity = _offer_identity(machine_estimate)
    plan = getattr(own, "plan", None)
    if own is not None and identity is not None and plan is not None:
        for offer in getattr(plan, "offers", None) or []:
            if (int(offer.offer_id), bool(offer.interruptible)) == identity:
                return seat_estimate(warm_estimate(_on_offer(own, offer)), seats)
    return seat_estimate(warm_estimate(machine_estimate), seats)


def _hours(estimate: "Estimate") -> float:
    return float(estimate.est_hours or 0.0)


def _cost(estimate: "Estimate") -> float:
    return float(estimate.est_usd or 0.0)


# ---- the simulation --------------------------------------------------------------------------

@dataclass
class _Seats:
    """A packed machine's seats (the scheduler's ``SharedMachine``): the pack it was rented
    for, its first run, which slot each seat holds."""

    pack: Pack
    lead: int  # the slot that rented it, on seat 0
    opens_h: float  # when that run is past the machine's setup
    holders: list[int | None]
    unopened: set[int]  # seats 1..N-1 no run has taken yet (closed when none is pending)
    lead_running: bool = True
    busy_h: float = 0.0  # run-hours on its seats so far


class _Simulation:
    def __init__(self, items: list[ScheduleItem], *, max_parallel: int, budget_usd: float,
                 margin: float | None, reuse: bool, gpus_per_machine: int = 1) -> None:
        self.max_parallel = max(1, int(max_parallel))
        self.reuse = reuse
        self.gpus_per_machine = max(1, int(gpus_per_machine))
        self.ledger = Ledger(budget_usd)
        self.slots = [
            _Slot(idx, item, machine_key(item.spec), RunRow(item.name),
                  item.spec.budget.safety_margin if margin is None else float(margin))
            for idx, item in enumerate(items)]
        self.pending: list[_Slot] = []
        self.machines: list[MachinePlan] = []
        self.machine_estimates: list["Estimate"] = []  # the cold estimate each was rented on
        self.machine_keys: list[str] = []  # the machine_key of each machine's first run
        self.claimed: dict[int, tuple[int, bool]] = {}  # machine index -> offer it holds
        self.seated: dict[int, _Seats] = {}  # packed machines
        # (time, _OPEN | _END, machine, slot idx, cost)
        self.events: list[tuple[float, int, int, int, float]] = []
        for slot in self.slots:
            if slot.item.estimate is None:
                slot.row.skipped = f"budget ({slot.item.error or 'no estimate'})"
            else:
                self.pending.append(slot)

    def run(self) -> None:
        self._start_what_fits(0.0)
        while self.events:
            now, kind, machine, idx, cost = heapq.heappop(self.events)
            if kind == _END:  # (_OPEN: only the round below, which opens the seats)
                self.ledger.close(f"slot-{idx}", cost)
                if machine in self.seated:
                    self._free_seat(machine, idx, now)
                elif not (self.reuse and self._hand_over(machine, now)):
                    self._end(machine, now)
            self._start_what_fits(now)

    def _end(self, machine: int, now: float) -> None:
        plan = self.machines[machine]
        plan.end_h = now
        self.claimed.pop(machine, None)
        seats = self.seated.get(machine)
        if seats is not None:  # its idle seat-hours, in place of its idle reserve
            idle_h = max(0.0, plan.seats * plan.hours - seats.busy_h)
            plan.idle_usd = idle_h * plan.dph_total / plan.seats
            plan.est_usd += plan.idle_usd
            self.ledger.close(f"machine-{machine}", plan.idle_usd)

    def _hand_over(self, machine: int, now: float) -> bool:
        """Rule 2: the first pending slot with the machine's key whose warm reservation fits
        takes it."""
        for slot in [s for s in self.pending if s.key == self.machine_keys[machine]]:
            estimate = _warm_on(slot, self.machine_estimates[machine])
            amount = slot.reservation(estimate)
            if self.ledger.try_reserve(f"slot-{slot.idx}", amount):
                self._place(slot, machine, estimate, amount, now, WARM)
                return True
        return False

    def _open_seats(self, now: float) -> None:
        """Rule 7 (the scheduler's ``_open_seats``): the seats no run has taken yet, of each
        machine whose first run is still on it and past the setup, take pending runs."""
        for machine, seats in self.seated.items():
            if seats.lead_running and now >= seats.opens_h - 1e-9:
                for seat in sorted(seats.unopened):
                    if not self._open_seat(machine, seat, now):
                        break

    def _open_seat(self, machine: int, seat: int, now: float) -> bool:
        """The first pending run of the key whose reservation of the pack's warm seat fits
        takes ``seat``; with none pending the unopened seats close (none fits: tried again on
        the next round)."""
        seats = self.seated[machine]
        candidates = [s for s in self.pending if s.key == self.machine_keys[machine]]
        if not candidates:
            seats.unopened.clear()
            return False
        for slot in candidates:
            amount = slot.reservation(seats.pack.warm)
            if self.ledger.try_reserve(f"slot-{slot.idx}", amount):
                seats.unopened.discard(seat)
                self._place(slot, machine, seats.pack.warm, amount, now, WARM, seat=seat)
                return True
        return False

    def _promised_seats(self) -> dict[str, int]:
        """Per machine key, the seats not open yet of machines whose first run is on them: as
        many pending runs of the key wait for them (the scheduler's ``_promised_seats``)."""
        promised: dict[str, int] = {}
        for machine, seats in self.seated.items():
            if seats.lead_running and seats.unopened:
                key = self.machine_keys[machine]
                promised[key] = promised.get(key, 0) + len(seats.unopened)
        return promised

    def _free_seat(self, machine: int, idx: int, now: float) -> None:
        """Rule 7: a seat's run ended; the seat goes to the first pending run of the key whose
        own warm seat estimate fits (rule 2, one seat), or stays empty. The machine ends when no
        seat holds a run."""
        seats = self.seated[machine]
        seat = seats.holders.index(idx)
        seats.holders[seat] = None
        if idx == seats.lead:
            seats.lead_running = False
        for slot in [s for s in self.pending if s.key == self.machine_keys[machine]]:
            estimate = _seat_on(slot, self.machine_estimates[machine], seats.pack.seats)
            amount = slot.reservation(estimate)
            if self.ledger.try_reserve(f"slot-{slot.idx}", amount):
                self._place(slot, machine, estimate, amount, now, WARM, seat=seat)
                return
        if all(holder is None for holder in seats.holders):
            self._end(machine, now)

    def _start_what_fits(self, now: float) -> None:
        """Rules 3, 4, 6 and 7, in batch order."""
        self._open_seats(now)
        promised = self._promised_seats()
        for slot in list(self.pending):
            if len(self.claimed) >= self.max_parallel:
                return
            if promised.get(slot.key):  # waits for a seat of a machine being set up
                promised[slot.key] -= 1
                continue
            estimate = _cold_estimate(slot, set(self.claimed.values()))
            pack = None if estimate is None else self._start_pack(slot, estimate, now)
            if pack is not None:  # its other seats are promised from now on
                promised[slot.key] = promised.get(slot.key, 0) + pack.seats - 1
                continue
            amount = None if estimate is None else slot.reservation(estimate)
            if estimate is not None and amount is not None and \
                    not self._room_for_warm_runs(slot, estimate, amount):
                continue  # waits for a running machine of its key
            if estimate is None or amount is None or \
                    not self.ledger.try_reserve(f"slot-{slot.idx}", amount):
                if not self.claimed:  # nothing running can give money or an offer back
                    self.pending.remove(slot)
                    slot.row.skipped = self._why_not(slot, estimate, amount)
                continue
            index = self._rent(slot, estimate, now)
            self._place(slot, index, estimate, amount, now, COLD)

    def _pack_for(self, slot: _Slot, single: "Estimate") -> Pack | None:
        """Rule 6's choice: the pack of the slot's item cheaper per run than ``single``."""
        if self.gpus_per_machine < 2 or not self.reuse or not slot.item.packs or \
                not can_pack(slot.item.spec):
            return None
        same_key = sum(1 for s in self.pending if s.key == slot.key)
        claimed = set(self.claimed.values())
        machines: dict[int, "Estimate"] = {}
        for seats in PACK_SIZES:
            if 2 <= seats <= min(same_key, self.gpus_per_machine):
                estimate = _on_free_offer(slot.item.packs.get(seats), claimed)
                if estimate is not None:
                    machines[seats] = estimate
        return choose_pack(single, machines)

    def _start_pack(self, slot: _Slot, single: "Estimate", now: float) -> Pack | None:
        """Rule 6: the slot starts seat 0 of a new multi-GPU machine when its pack wins and
        the ledger has room for the whole pack; the pack, or None."""
        pack = self._pack_for(slot, single)
        if pack is None or not self.ledger.fits(pack.total_reserve(slot.reservation)):
            return None
        amount = slot.reservation(pack.lead)
        index = len(self.machines)
        self.ledger.try_reserve(f"slot-{slot.idx}", amount)
        self.ledger.try_reserve(f"machine-{index}", pack.idle_usd)
        self._rent(slot, pack.machine, now, seats=pack.seats)
        opens_h = now + self.machines[index].setup_s / 3600.0
        self.seated[index] = _Seats(pack, slot.idx, opens_h, [None] * pack.seats,
                                    set(range(1, pack.seats)))
        self._place(slot, index, pack.lead, amount, now, COLD, seat=0)
        heapq.heappush(self.events, (opens_h, _OPEN, index, -1, 0.0))
        return pack

    def _rent(self, slot: _Slot, estimate: "Estimate", now: float, *, seats: int = 1) -> int:
        """A new machine on ``estimate``'s offer (the whole machine's estimate); its index."""
        setup_s, setup_usd = setup_part(estimate)
        chosen = getattr(getattr(estimate, "plan", None), "chosen", None)
        index = len(self.machines)
        self.machines.append(MachinePlan(
            index=index, offer_id=None if chosen is None else int(chosen.offer_id),
            gpu_name=estimate.gpu_name, dph_total=float(estimate.price_per_hour),
            interruptible=bool(chosen is not None and chosen.interruptible),
            setup_s=setup_s, setup_usd=setup_usd, start_h=now,
            num_gpus=1 if chosen is None else int(chosen.num_gpus), seats=seats))
        self.machine_estimates.append(estimate)
        self.machine_keys.append(slot.key)
        identity = _offer_identity(estimate)
        self.claimed[index] = identity if identity is not None else (-1 - index, False)
        return index

    def _room_for_warm_runs(self, slot: _Slot, estimate: "Estimate", amount: float) -> bool:
        """Rule 3's limit (the scheduler's ``_room_for_warm_runs``): with a machine running, a new
        one must leave the money the other pending runs of its key need warm."""
        if not self.reuse or not self.claimed:
            return True
        others = sum(1 for s in self.pending if s is not slot and s.key == slot.key)
        warm = slot.reservation(warm_estimate(estimate))
        return self.ledger.remaining() - amount >= others * warm

    def _why_not(self, slot: _Slot, estimate: "Estimate | None", amount: float | None) -> str:
        if estimate is None or amount is None:
            return "budget (no offer fits its plan)"
        return (f"budget (needs ${amount:.2f}, ${max(0.0, self.ledger.remaining()):.2f} left "
                f"of ${self.ledger.total_usd:.2f})")

    def _place(self, slot: _Slot, machine: int, estimate: "Estimate", amount: float,
               now: float, start: str, *, seat: int = 0) -> None:
        self.pending.remove(slot)
        plan = self.machines[machine]
        plan.runs.append(slot.item.name)
        plan.est_usd += _cost(estimate)
        end = now + _hours(estimate)
        plan.end_h = max(plan.end_h, end)
        seats = self.seated.get(machine)
        if seats is not None:
            seats.holders[seat] = slot.idx
            seats.busy_h += _hours(estimate)
        row = slot.row
        row.machine, row.order, row.seat, row.start = machine, len(plan.runs), seat, start
        row.est_usd, row.est_hours = estimate.est_usd, estimate.est_hours
        row.reserved_usd, row.start_h, row.end_h = amount, now, end
        heapq.heappush(self.events, (end, _END, machine, slot.idx, _cost(estimate)))


def _simulate(items: list[ScheduleItem], *, max_parallel: int, budget_usd: float,
              margin: float | None, reuse: bool, gpus_per_machine: int = 1) -> BatchSchedule:
    sim = _Simulation(items, max_parallel=max_parallel, budget_usd=budget_usd, margin=margin,
                      reuse=reuse, gpus_per_machine=gpus_per_machine)
    sim.run()
    return BatchSchedule(budget_usd=budget_usd, max_parallel=sim.max_parallel, reuse=reuse,
                         machines=sim.machines, runs=[slot.row for slot in sim.slots],
                         gpus_per_machine=sim.gpus_per_machine)


def with_packs(items: list[ScheduleItem], estimate: Callable[["RunSpec"], "Estimate"], *,
               gpus_per_machine: int, reuse: bool) -> list[ScheduleItem]:
    """Each item with the estimates of the multi-GPU machines the schedule may pack it on
    (``ScheduleItem.packs``): only when the batch allows packing and at least two runs share its
    machine key, for each N of ``packing.PACK_SIZES`` up to that count and ``gpus_per_machine``.
    An N that no offer fits is left out."""
    from collections import Counter

    from controller.errors import BudgetError, ProviderError
    from controller.planning.packing import pack_spec

    if gpus_per_machine < 2 or not reuse:
        return items
    keys = [machine_key(item.spec) for item in items]
    counts = Counter(key for key, item in zip(keys, items) if item.estimate is not None)
    packed = []
    for key, item in zip(keys, items):
        sizes = [n for n in PACK_SIZES if n <= min(counts[key], gpus_per_machine)]
        if item.estimate is None or not sizes or not can_pack(item.spec):
            packed.append(item)
            continue
        packs: dict[int, "Estimate"] = {}
        for seats in sizes:
            try:
                packs[seats] = estimate(pack_spec(item.spec, seats))
            except (BudgetError, ProviderError):
                continue  # no N-GPU offer fits: that size is not a choice
        packed.append(replace(item, packs=packs))
    return packed


def schedule_batch(items: list[ScheduleItem], *, max_parallel: int, budget_usd: float,
                   margin: float | None = None, reuse: bool = True,
                   gpus_per_machine: int = 1) -> BatchSchedule:
    """The batch as the scheduler would run it if every estimate came true (module docstring).

    ``margin`` overrides each run's ``budget.safety_margin`` in its reservation.
    ``gpus_per_machine`` > 1 lets runs share a multi-GPU machine (rules 6 and 7; the items'
    ``packs``). The result's ``per_run`` prices the runs this schedule places, one instance per
    run, with the same ``max_parallel`` and no batch cap (so it prices all of them): the baseline
    of the saving.
    """
    schedule = _simulate(items, max_parallel=max_parallel, budget_usd=budget_usd,
                         margin=margin, reuse=reuse, gpus_per_machine=gpus_per_machine)
    placed = {row.name for row in schedule.runs if row.skipped is None}
    schedule.per_run = _simulate([item for item in items if item.name in placed],
                                 max_parallel=max_parallel, budget_usd=math.inf, margin=margin,
                                 reuse=False)
    return schedule
