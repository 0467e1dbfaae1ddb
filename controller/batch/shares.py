"""How a batch's machines split between the runs that used them one after another.

A machine handed from run to run (``controller.run.handover``) pays its setup once: the
renting and booting, the runtime checks and the bootstrap (ai-toolkit, caches) of its first run,
plus that run's estimated download of the image, the installs and the weights. Every run on the
machine carries an equal share of that setup; each run's own time on it (from when it took the
machine to when it let it go) and its own transfers are its own. The shares add up to exactly
what the machines were metered, so the batch total does not move; only who carries what does.

Setup ends, for the first run on a machine, when the controller first saw its agent past the
``bootstrap`` stage (the journal's ``agent_stage`` events, laptop clock); without such an event
(a run too short for a poll to see it) only the boot, up to the agent's start, counts.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from controller.journal import INSTANCE_FAILED, seat_of
from controller.run.relaunch import row_usd

if TYPE_CHECKING:
    from controller.journal import Journal

SETUP_STAGES = ("checks", "bootstrap")
BOOT_DOWNLOAD = "image, installs and weights"  # the Vast provider's estimated boot transfer


def _setup_end(journal: "Journal", run_id: str) -> float | None:
    for event in journal.events(run_id, kind="agent_stage"):
        if event["detail"].get("stage") not in SETUP_STAGES:
            return float(event["at"])
    started = journal.events(run_id, kind="agent_started")
    return float(started[0]["at"]) if started else None


def _rented(journal: "Journal", run_id: str) -> list[dict[str, Any]]:
    """The run's rows for machines it rented itself (each paid its own boot download)."""
    return [r for r in journal.instances(run_id)
            if r["state"] != INSTANCE_FAILED and _from_row(r) is None]


def _bandwidth(journal: "Journal", run_id: str) -> tuple[float, float]:
    """``(boot download, everything else)`` in dollars, from the run's transfer events."""
    boot = other = 0.0
    for event in journal.events(run_id, kind="transfer"):
        usd = float(event["detail"].get("usd") or 0.0)
        if event["detail"].get("what") == BOOT_DOWNLOAD:
            boot += usd
        else:
            other += usd
    return boot, other


def _from_row(row: dict[str, Any]) -> int | None:
    """The row this one took its machine over from (``Journal.hand_over_instance``), or None."""
    try:
        detail = json.loads(row.get("detail") or "{}")
    except ValueError:
        return None
    found = detail.get("from_row") if isinstance(detail, dict) else None
    return int(found) if isinstance(found, int) else None


def machine_split(journal: "Journal", run_ids: list[str],
                  now: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The batch's machines (each with its runs in order, its setup and its total) and, per run,
    what it was metered and what its share is (own time and transfers + its share of setups).

    A machine is a chain of rows linked by their handovers (``from_row``), not an instance id:
    own hardware (``local``, ``ssh``) journals every machine under one name."""
    per_run = {run_id: {"metered_usd": 0.0, "own_usd": 0.0, "setup_share_usd": 0.0,
                        "share_usd": 0.0, "machines": []} for run_id in run_ids}
    rows = [r for run_id in run_ids for r in journal.instances(run_id)
            if r["state"] != INSTANCE_FAILED]
    taken = {_from_row(r): r for r in rows if _from_row(r) is not None}
    machines: list[dict[str, Any]] = []
    names: set[str] = set()
    seated: dict[str, list[list[dict[str, Any]]]] = {}  # a shared instance: a chain per seat
    for head in sorted((r for r in rows if _from_row(r) is None), key=lambda r: r["id"]):
        chain = [head]
        while chain[-1]["id"] in taken:
            chain.append(taken[chain[-1]["id"]])
        if seat_of(head) and head.get("instance_id"):
            seated.setdefault(str(head["instance_id"]), []).append(chain)
            continue
        iid = str(head.get("instance_id") or f"row-{head['id']}")
        if iid in names:
            iid = f"{iid}#{head['id']}"
        names.add(iid)
        machines.append(_machine(journal, iid, chain, per_run, now))
    for iid, chains in seated.items():
        machines.append(_shared_machine(journal, iid, chains, per_run, now))
    for run_id, entry in per_run.items():
        boot, other = _bandwidth(journal, run_id)
        entry["metered_usd"] += boot + other
        entry["own_usd"] += other
        entry["share_usd"] = entry["own_usd"] + entry["setup_share_usd"]
        for key in ("metered_usd", "own_usd", "setup_share_usd", "share_usd"):
            entry[key] = round(entry[key], 6)
    return machines, per_run


def _shared_machine(journal: "Journal", iid: str, chains: list[list[dict[str, Any]]],
                    per_run: dict[str, dict[str, Any]], now: float) -> dict[str, Any]:
    """A multi-GPU instance whose seats ran several runs at once
    (``controller.planning.packing``). Its setup is the first run's, on seat 0, plus the
    machine's idle seats (:func:`controller.batch.seats.idle_usd`: while it was set up, and after
    a seat's last run while another still trained); every run on it carries an equal share. The
    idle is metered to no run (the batch ledger holds it), so the shares add up to what the runs
    were metered plus the idle."""
    from controller.batch.seats import idle_usd

    rows = sorted((row for chain in chains for row in chain), key=lambda r: r["id"])
    machine = _machine(journal, iid, chains[0], per_run, now)
    for chain in chains[1:]:
        for row in chain:
            usd = row_usd(row, now)
            entry = per_run[row["run_id"]]
            entry["metered_usd"] += usd
            entry["own_usd"] += usd
            entry["machines"].append(iid)
            machine["metered_usd"] = round(machine["metered_usd"] + usd, 6)
    # rows of runs outside this batch are not in ``rows``: the idle is over every seat's row
    idle = idle_usd(journal.machine_rows(iid), now)
    runs = [row["run_id"] for row in rows]
    setup_usd = machine["setup_usd"] + idle
    share = setup_usd / max(1, len(runs))
    for run_id in runs:
        per_run[run_id]["setup_share_usd"] += share - (machine["setup_share_usd"]
                                                       if run_id in machine["runs"] else 0.0)
    seats = max(seat_of(row).get("seats", 1) for row in rows)
    return {**machine, "runs": runs, "seats": seats, "price_per_hour": machine["price_per_hour"]
            * seats, "idle_usd": round(idle, 6), "setup_usd": round(setup_usd, 6),
            "setup_share_usd": round(share, 6), "metered_usd": round(machine["metered_usd"]
                                                                      + idle, 6),
            "hours": round(sum(max(0.0, float(r.get("destroyed_at") or now)
                                   - float(r.get("billing_started_at") or now))
                               for r in rows) / 3600, 6)}


def _machine(journal: "Journal", iid: str, chain: list[dict[str, Any]],
             per_run: dict[str, dict[str, Any]], now: float) -> dict[str, Any]:
    first = chain[0]
    price = float(first.get("dph_total") or 0.0)
    started = float(first.get("billing_started_at") or 0.0)
    first_end = float(first.get("destroyed_at") or now)
    end = _setup_end(journal, first["run_id"])
    setup_s = max(0.0, min(end, first_end) - started) if end is not None and started else 0.0
    boot_bw = _bandwidth(journal, first["run_id"])[0] / max(1, len(_rented(journal,
                                                                      first["run_id"])))
    setup_usd = setup_s / 3600 * price + boot_bw
    share = setup_usd / len(chain)
    total = 0.0
    for index, row in enumerate(chain):
        usd = row_usd(row, now)
        total += usd
        entry = per_run[row["run_id"]]
        entry["metered_usd"] += usd
        entry["own_usd"] += usd - (setup_s / 3600 * price if index == 0 else 0.0)
        entry["setup_share_usd"] += share
        entry["machines"].append(iid)
    return {"instance_id": iid, "gpu_name": first.get("gpu_name"), "price_per_hour": price,
            "runs": [row["run_id"] for row in chain], "setup_s": round(setup_s, 1),
            "setup_usd": round(setup_usd, 6), "setup_share_usd": round(share, 6),
            "metered_usd": round(total + boot_bw, 6),
            "hours": round(sum(max(0.0, float(r.get("destroyed_at") or now)
                                   - float(r.get("billing_started_at") or now))
                               for r in chain) / 3600, 6)}
