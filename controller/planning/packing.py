"""Several runs at once on one multi-GPU instance: one trainer per GPU ("seat").

A batch with ``batch.reuse_machines`` may rent an offer with N GPUs for N runs of the same
:func:`~controller.planning.reuse.machine_key` instead of N instances. The instance bills
``dph_total`` whatever its GPUs do, so each seat is priced ``dph_total / N``: a run's own meter,
its reservation and the agent's cost guard use that share, and the time a seat holds no run
(while the first run sets the machine up, and after a seat's last run ended while another still
trains) is the machine's *idle* cost, metered into the batch ledger
(:func:`controller.batch.seats.idle_usd`).

The choice (:func:`choose_pack`) is made from the estimates the planner already has: a pack of
N wins when one seat's share of the N-GPU machine (the machine's estimate for one run's duration,
divided by N) plus its share of the idle setup is cheaper than a run on its own instance. Only
on-demand offers are packed: an outbid machine would end N runs at once.

The first run rents the machine and sets it up on seat 0 alone; the other seats open once its
agent is past ``bootstrap`` (ai-toolkit installed, weights cached), so they start warm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from controller.planning.reuse import setup_part, warm_estimate

if TYPE_CHECKING:
    from controller.providers.base import Estimate
    from controller.spec.model import RunSpec

PACK_SIZES = (2, 4, 8)
# Disk each extra seat adds: its dataset, latents, checkpoints and bundle (the weights are shared).
SEAT_DISK_GB = 20.0


def can_pack(spec: "RunSpec") -> bool:
    """Whether runs of this spec may share a multi-GPU instance at all."""
    return spec.provider.type == "vast" and spec.gpu.num_gpus == 1 and not spec.gpu.interruptible


def pack_spec(spec: "RunSpec", seats: int) -> "RunSpec":
    """The spec the planner prices an N-GPU machine with: N GPUs, N times the RAM (one trainer
    per GPU, each quantizing in system RAM), the disk of one run plus :data:`SEAT_DISK_GB` per
    extra seat, and a budget of N runs (the estimate is for the whole machine)."""
    from controller.spec.model import RunSpec

    data = spec.model_dump(mode="json")
    gpu = data["gpu"]
    gpu["num_gpus"] = seats
    gpu["min_ram_gb"] = float(gpu["min_ram_gb"]) * seats
    gpu["disk_gb"] = float(gpu["disk_gb"]) + SEAT_DISK_GB * (seats - 1)
    data["budget"]["max_usd"] = float(data["budget"]["max_usd"]) * seats
    return RunSpec.model_validate(data)


def seat_estimate(machine: "Estimate", seats: int) -> "Estimate":
    """One seat's share of an N-GPU machine's estimate (price and dollars divided by N)."""
    usd = None if machine.est_usd is None else machine.est_usd / seats
    return replace(machine, price_per_hour=machine.price_per_hour / seats, est_usd=usd,
                   seats=seats,
                   notes=[*machine.notes, f"one of {seats} GPUs of this instance: "
                                          f"${machine.price_per_hour / seats:.3f}/h"])


def boot_download_usd(machine: "Estimate") -> float:
    """The machine's boot download (image, installs, weights) at its ``inet_down_cost``: metered
    on the first run, which rents the machine (``VastProvider._bill_boot_download``)."""
    chosen = getattr(getattr(machine, "plan", None), "chosen", None)
    if chosen is None:
        return 0.0
    return float(chosen.offer.get("inet_down_cost") or 0.0) * \
        float(chosen.breakdown.get("boot_gb") or 0.0)


def idle_setup_usd(machine: "Estimate", seats: int) -> float:
    """What the seats without a run cost while the first run sets the machine up (they open
    after its bootstrap: N-1 seats for the setup time), plus one seat for as long again for the
    tail (a seat whose runs are over while another still trains). The batch reserves this for
    the machine: ``dph_total x setup time``."""
    seconds, _ = setup_part(machine)
    return machine.price_per_hour * seconds / 3600.0 * ((seats - 1) / seats + 1 / seats)


@dataclass(frozen=True)
class Pack:
    """An N-GPU offer chosen for N runs: the machine's estimate, the first run's seat (cold),
    a later run's seat (warm) and the idle reserve."""

    seats: int
    machine: "Estimate"
    lead: "Estimate"
    warm: "Estimate"
    idle_usd: float

    def per_run_usd(self) -> float:
        """The N runs' expected cost divided by N: the first run's seat, N-1 warm seats, the
        idle setup and tail."""
        return (float(self.lead.est_usd or 0.0) + (self.seats - 1) * float(self.warm.est_usd or 0.0)
                + self.idle_usd) / self.seats

    def total_reserve(self, reserve: Callable[["Estimate"], float]) -> float:
        """The money the pack needs at its start: the lead's and the other seats' reservations
        (``reserve(estimate)``: ``reservation_for`` with the run's margin) plus the idle."""
        return reserve(self.lead) + (self.seats - 1) * reserve(self.warm) + self.idle_usd


def make_pack(machine: "Estimate", seats: int) -> Pack:
    lead = seat_estimate(machine, seats)
    if lead.est_usd is not None:  # the first run's meter carries the whole boot download
        lead = replace(lead, est_usd=lead.est_usd + boot_download_usd(machine) * (seats - 1)
                       / seats)
    return Pack(seats=seats, machine=machine, lead=lead,
                warm=seat_estimate(warm_estimate(machine), seats),
                idle_usd=idle_setup_usd(machine, seats))


def choose_pack(single: "Estimate", packs: dict[int, "Estimate"]) -> Pack | None:
    """The cheapest pack per run, when it is cheaper per run than ``single`` (a run on its own
    instance, cold); None otherwise. ``packs``: N -> the N-GPU machine's estimate."""
    if single.est_usd is None:
        return None
    best: Pack | None = None
    for seats, machine in sorted(packs.items()):
        if seats < 2 or machine.est_usd is None:
            continue
        pack = make_pack(machine, seats)
        if best is None or pack.per_run_usd() < best.per_run_usd():
            best = pack
    if best is None or best.per_run_usd() >= float(single.est_usd):
        return None
    return best
