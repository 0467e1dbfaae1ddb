"""The seats of a batch's multi-GPU instances: when they open, and what their idle time costs.

A pack (:mod:`controller.planning.packing`) is rented by its first run on seat 0. The other
seats open once that run's agent is past its setup (:func:`past_setup`): ai-toolkit is installed
and the weights are cached, so the runs that take them start warm. Each run's journal row is
billed at ``dph_total / N`` for as long as it holds its seat; the rest of the machine's bill
(seats without a run: during the setup, and after a seat's last run while another still trains)
is the machine's idle cost (:func:`idle_usd`), which the batch ledger meters under
:func:`idle_key` against the reserve the pack was started with. So the ledger always holds the
whole machine: seats plus idle add up to ``dph_total x the machine's lifetime``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controller.journal import (INSTANCE_ALIVE_STATES, INSTANCE_FAILED, seat_of)
from controller.run.relaunch import row_usd

if TYPE_CHECKING:
    from controller.journal import Journal

SETUP_STAGES = ("checks", "bootstrap")
IDLE_RESERVE = "ledger_reserve_idle"  # the journal event of a pack's idle reserve


IDLE_PREFIX = "idle:"


def idle_key(lead_run_id: str) -> str:
    """The batch ledger's entry for the idle seats of the machine ``lead_run_id`` rented."""
    return f"{IDLE_PREFIX}{lead_run_id}"


def journaled_instance(journal: "Journal", lead_run_id: str) -> str | None:
    """The instance of the pack ``lead_run_id`` rented, as its idle reserve event names it."""
    for event in reversed(journal.events(lead_run_id, kind=IDLE_RESERVE)):
        if event["detail"].get("instance_id"):
            return str(event["detail"]["instance_id"])
    return None


def past_setup(journal: "Journal", run_id: str) -> bool:
    """Whether the controller has seen the run's agent past its checks and bootstrap."""
    return any(event["detail"].get("stage") not in SETUP_STAGES
               for event in journal.events(run_id, kind="agent_stage"))


def seat_rows(journal: "Journal", instance_id: Any) -> list[dict[str, Any]]:
    """The rows of a shared instance (every seat, every run that held one)."""
    return [row for row in journal.machine_rows(instance_id) if seat_of(row)]


def alive(rows: list[dict[str, Any]]) -> bool:
    return any(row["state"] in INSTANCE_ALIVE_STATES for row in rows)


def idle_usd(rows: list[dict[str, Any]], now: float) -> float:
    """What the machine of ``rows`` billed beyond its seats' own rows: ``N x seat price`` from
    its first billing to its end (now while a row is alive), minus what the rows billed."""
    rows = [r for r in rows if r["state"] != INSTANCE_FAILED and
            r.get("billing_started_at") is not None]
    if not rows:
        return 0.0
    seats = max(seat_of(r).get("seats", 1) for r in rows)
    price = float(rows[0].get("dph_total") or 0.0)
    start = min(float(r["billing_started_at"]) for r in rows)
    end = now if alive(rows) else max(float(r.get("destroyed_at") or now) for r in rows)
    whole = max(0.0, end - start) / 3600.0 * price * seats
    return max(0.0, whole - sum(row_usd(r, end) for r in rows))


def batch_idle_usd(journal: "Journal", runs: list[dict[str, Any]], now: float) -> float:
    """What the idle GPUs of these runs' multi-GPU instances cost so far (``cost BATCH``)."""
    return sum(spent for _, spent, _ in journaled_idle(journal, runs, now).values())


def journaled_idle(journal: "Journal", runs: list[dict[str, Any]],
                   now: float) -> dict[str, tuple[float, float, bool]]:
    """For ``resume``: each pack of these runs as ``idle_key -> (reserved, idle so far, open)``,
    from the idle reserves journaled when the packs started."""
    found: dict[str, tuple[float, float, bool]] = {}
    for run in runs:
        events = journal.events(run["run_id"], kind=IDLE_RESERVE)
        if not events:
            continue
        reserved = float(events[-1]["detail"].get("reserved_usd") or 0.0)
        instance_id = journaled_instance(journal, run["run_id"])
        rows = seat_rows(journal, instance_id) if instance_id else []
        if not rows:  # the machine never came: nothing idled
            found[idle_key(run["run_id"])] = (reserved, 0.0, False)
            continue
        found[idle_key(run["run_id"])] = (reserved, idle_usd(rows, now), alive(rows))
    return found
