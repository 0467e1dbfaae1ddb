"""Seats: several runs at once on one multi-GPU instance, one trainer per GPU.

The controller (``controller.planning.packing``) may rent an N-GPU instance for N runs of a
batch. Each run then has its own run dir under the same root, its own agent and its own
heartbeat, and its plan's ``instance`` block says which GPU it owns: ``seat`` (0-based) and
``seats`` (how many runs share the machine; absent or 1 = the whole machine, as before).

A seated agent pins itself to its GPU before anything imports torch or starts a trainer:
``CUDA_VISIBLE_DEVICES=<seat>`` in its own environment, so every child sees that one GPU as
CUDA device 0. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` goes with it: CUDA's default order is "fastest
first", nvidia-smi's is the PCI bus order (CUDA Toolkit documentation, "CUDA Environment
Variables"), and only with the bus order is CUDA's index ``seat`` the GPU that nvidia-smi lists
in row ``seat`` (the row the checks look at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping


@dataclass(frozen=True)
class Seat:
    """This run's GPU (``seat``) among the ``seats`` runs that share the instance."""

    seat: int = 0
    seats: int = 1

    @property
    def shared(self) -> bool:
        """Other runs share this machine: the agent owns one GPU and a share of the rest."""
        return self.seats > 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seat_problem(plan: Mapping[str, Any]) -> str | None:
    """What is wrong with the plan's ``instance.seat`` / ``instance.seats``, or None."""
    instance = plan.get("instance")
    if instance is None:
        return None
    if not isinstance(instance, Mapping):
        return "plan.instance is not an object"
    seats, seat = instance.get("seats"), instance.get("seat")
    if seats is not None and (not _is_int(seats) or seats < 1):
        return f"instance.seats {seats!r} is not a whole number of at least 1"
    count = 1 if seats is None else seats
    if seat is None:
        return f"instance.seats is {count} but instance.seat is missing" if count > 1 else None
    if not _is_int(seat) or seat < 0:
        return f"instance.seat {seat!r} is not a whole number of at least 0"
    if seat >= count:
        return f"instance.seat {seat} is not below instance.seats {count}"
    return None


def seat_of(plan: Mapping[str, Any]) -> Seat:
    """The plan's seat (``Seat(0, 1)`` without one); ValueError for a plan
    :func:`seat_problem` rejects (``remote.plan.load_plan`` already did)."""
    problem = seat_problem(plan)
    if problem:
        raise ValueError(problem)
    instance = plan.get("instance") or {}
    return Seat(seat=instance.get("seat") or 0, seats=instance.get("seats") or 1)


def pin_gpu(seat: Seat, environ: MutableMapping[str, str]) -> dict[str, str]:
    """Pin ``environ`` to the seat's GPU when the machine is shared; returns what was set
    (nothing for a run that has the whole machine)."""
    if not seat.shared:
        return {}
    pinned = {"CUDA_VISIBLE_DEVICES": str(seat.seat), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    environ.update(pinned)
    return pinned
