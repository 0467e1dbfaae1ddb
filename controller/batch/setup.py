"""Creating and reading batches: the journaled batch, its slots and its ledger.

``create_batch`` journals a batch file's expanded runs as *slots* (``pending``); the scheduler
(:mod:`controller.batch.scheduler`) drives them from there. Slot states: ``pending -> active -> done |
failed | stopped``, or ``skipped``.

The rest reads a batch back for the views and ``resume``: :func:`find_batch` (id or prefix),
:func:`batch_ledger` (the :class:`~controller.batch.ledger.Ledger` rebuilt from the journal),
:func:`batch_rows` (one row per slot with its run's live numbers), and :func:`plan_batch` (what
each run would cost and reserve, for ``launch --dry-run``), and :func:`estimate_runs` (each run's
estimate on a fresh machine, for the schedule ``flux-remote plan BATCH.yaml`` shows).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from controller.run import states as R
from controller.errors import BudgetError, SpecError
from controller.batch.ledger import Ledger, run_reservation

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.planning.schedule import ScheduleItem
    from controller.providers.base import Estimate, Provider
    from controller.spec.loader import LoadedFile
    from controller.spec.model import RunSpec

PENDING, ACTIVE, SKIPPED = "pending", "active", "skipped"
SLOT_TERMINAL = (R.DONE, R.FAILED, R.STOPPED, R.BUDGET, SKIPPED)


# ---- creating a batch ------------------------------------------------------------------------

def batch_name(loaded: "LoadedFile") -> str:
    """The base spec's ``name`` (the runs' names start with it)."""
    import yaml

    try:
        name = (yaml.safe_load(Path(loaded.path).read_text(encoding="utf-8")) or {}).get("name")
    except (OSError, yaml.YAMLError):
        name = None
    return str(name or (loaded.runs[0].name if loaded.runs else "batch"))


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def varied_params(loaded: "LoadedFile") -> tuple[list[str], list[dict[str, Any]]]:
    """The dotted keys a sweep (or the runs' overrides) vary, and each run's values of them."""
    batch = loaded.batch
    keys: list[str] = []
    if batch is not None and batch.sweep:
        keys = list(batch.sweep)
    elif batch is not None and batch.runs:
        for override in batch.runs:
            for key in override or {}:
                if key != "name" and key not in keys:
                    keys.append(key)
    dumps = [spec.model_dump(mode="json") for spec in loaded.runs]
    return keys, [{key: _dig(data, key) for key in keys} for data in dumps]


def create_batch(journal: "Journal", loaded: "LoadedFile", *, out_dir: Path | None = None,
                 spec_path: Path | None = None, clock: Callable[[], float] = time.time) -> str:
    """Journal a batch file's runs as pending slots; returns the batch id."""
    if loaded.batch is None:
        raise SpecError(f"{loaded.path} has no batch: section")
    name = batch_name(loaded)
    batch_id = R.new_run_id(f"{name}-batch", now=clock())
    root = Path(out_dir or Path("runs") / name).expanduser().resolve()
    keys, params = varied_params(loaded)
    items = []
    for idx, (spec, label, values) in enumerate(zip(loaded.runs, loaded.labels, params)):
        data = spec.model_dump(mode="json")
        data["dataset"]["path"] = str(Path(spec.dataset.path).expanduser().resolve())
        items.append({"idx": idx, "name": spec.name, "label": label, "params": values,
                      "spec": data})
    journal.create_batch(batch_id=batch_id, name=name,
                         spec_path=str(spec_path) if spec_path else None, out_dir=str(root),
                         max_usd=loaded.batch.max_usd, max_parallel=loaded.batch.max_parallel,
                         retries=loaded.batch.retries, margin=0.0, varied=keys, items=items,
                         reuse_machines=loaded.batch.reuse_machines,
                         gpus_per_machine=loaded.batch.gpus_per_machine)
    return batch_id


def find_batch(journal: "Journal", ref: str | None) -> dict[str, Any] | None:
    """The batch ``ref`` names (id or unique id prefix), or None when it names no batch."""
    if not ref:
        return None
    found = journal.find_batches(ref)
    return found[0] if len(found) == 1 else None


def slot_spec(slot: dict[str, Any]) -> "RunSpec":
    """The run spec a slot was journaled with."""
    from controller.spec.model import RunSpec

    return RunSpec.model_validate(json.loads(slot["spec_json"]))


def batch_ledger(journal: "Journal", batch: dict[str, Any]) -> Ledger:
    """The batch's ledger as the journal has it (what ``resume`` starts from)."""
    runs = journal.runs_of_batch(batch["batch_id"])
    reservations = {event["run_id"]: float(event["detail"]["reserved_usd"])
                    for run in runs for event in journal.events(run["run_id"], "ledger_reserve")}
    ledger = Ledger.from_runs(batch["max_usd"], runs, active_states=R.ACTIVE_STATES,
                              reservations=reservations)
    from controller.batch.seats import journaled_idle

    for key, (reserved, spent, open_) in journaled_idle(journal, runs, journal.clock()).items():
        ledger.restore(key, reserved, spent, open_)
    return ledger


def batch_rows(journal: "Journal", batch_id: str) -> list[dict[str, Any]]:
    """One row per slot for views: the slot joined with its current run's live numbers."""
    rows = []
    for slot in journal.batch_runs(batch_id):
        run = journal.get_run(slot["run_id"]) if slot["run_id"] else None
        run = run or {}
        rows.append({"idx": slot["idx"], "name": slot["name"], "label": slot["label"],
                     "params": json.loads(slot["params_json"] or "{}"), "slot_state": slot["state"],
                     "note": slot["note"], "attempts": slot["attempts"], "run_id": slot["run_id"],
                     "state": run.get("state") or slot["state"], "stage": run.get("stage"),
                     "step": run.get("step"), "total": run.get("total"), "loss": run.get("loss"),
                     "spend_usd": float(run.get("spend_usd") or 0.0),
                     "budget_usd": run.get("budget_usd"), "est_usd": run.get("est_usd"),
                     "out_dir": run.get("out_dir"), "bundle_path": run.get("bundle_path"),
                     "error": run.get("error"), "provider": run.get("provider")})
    return rows


def plan_batch(loaded: "LoadedFile",
               provider_for: Callable[[str], "Provider"]) -> list[dict[str, Any]]:
    """What each run is expected to cost and would reserve (``launch --dry-run`` of a batch)."""
    rows = []
    for spec in loaded.runs:
        try:
            estimate = provider_for(spec.provider.type).estimate(spec)
        except BudgetError as exc:
            rows.append({"name": spec.name, "est_usd": None, "reserve_usd": None,
                         "note": str(exc)})
            continue
        rows.append({"name": spec.name, "est_usd": estimate.est_usd, "gpu": estimate.gpu_name,
                     "reserve_usd": run_reservation(estimate, spec),
                     "note": ""})
    return rows


def offers_estimate(spec: "RunSpec", offers: list[dict[str, Any]],
                    measured_s_per_step: dict[str, float] | None = None) -> "Estimate":
    """The run's estimate on the cheapest fitting offer of ``offers``, as the Vast provider makes
    it (``VastProvider.estimate``); ``BudgetError`` when no offer fits."""
    from controller.planning.planner import plan_offers
    from controller.providers.base import Estimate

    plan = plan_offers(spec, offers, measured_s_per_step=measured_s_per_step)
    if plan.chosen is None:
        raise BudgetError(f"no Vast.ai offer can finish {spec.name!r}: {plan.refusal()}")
    return Estimate.from_plan(plan)


def estimate_runs(loaded: "LoadedFile",
                  estimate_one: Callable[["RunSpec"], "Estimate"]) -> list["ScheduleItem"]:
    """Each run of a batch with its estimate on a fresh machine, or the ``BudgetError`` that
    says no offer fits it (for :func:`controller.planning.schedule.schedule_batch`)."""
    from controller.planning.schedule import ScheduleItem

    items = []
    for spec in loaded.runs:
        try:
            items.append(ScheduleItem(spec.name, spec, estimate=estimate_one(spec)))
        except BudgetError as exc:
            items.append(ScheduleItem(spec.name, spec, error=str(exc)))
    return items
