"""A lost machine is a pause, not the end: the run continues on the next offer.

When the provider says the run's machine is gone (outbid, host offline, exited) and the spec
says ``gpu.on_lost: continue`` (the default on ``vast``), the orchestrator calls
:func:`after_loss` instead of failing the run:

1. The loss is journaled (``machine_lost``, by the follower). When the last status seen named a
   checkpoint newer than the one at home, that newer copy is only on the lost machine: it is
   kept stopped and started again, for at most ``RESTART_WAIT_S``. If it comes back, the run
   goes on there (``machine_restarted``; the agent resumes from its own newest checkpoint).
2. Otherwise the old instance is destroyed (journaled, confirmed) and a ``continue`` event records
   the step and the file the run continues from: the newest checkpoint brought home, checked
   here (it came from an untrusted machine) with the agent's own LoRA validation.
3. :func:`acquire_next` re-plans what is left (the remaining steps, with the money left after
   every earlier machine and the bandwidth) and rents the best offer that fits; when none fits
   the run ends ``stopped`` (``budget_end``) with the checkpoint at home as its result.
4. :func:`ship_checkpoint` puts that checkpoint into the new run dir's dataset folder and
   :func:`plan_spec` points ``training.resume_from_checkpoint`` at it (the agent's documented
   resume path, ``remote.resume``), with the budget left as the agent's own cap.

Same run id, one journal history; :func:`machines` lists every machine and what each cost for the
receipt. Every step reads the journal, so ``resume RUN`` continues a run whose machine was lost
while the laptop was closed: its follow finds the machine gone and lands here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.errors import BudgetError, FluxRemoteError, ProviderError, TransportError
from controller.run import states as R
from controller.run.follow import fetched_checkpoint
from controller.journal import untrusted_machine

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.providers.base import Estimate, Machine
    from controller.run.follow import MachineLost
    from controller.run.orchestrator import Orchestrator
    from controller.spec.model import RunSpec

CONTINUE = "continue"  # journal event: the run continues on a new machine from "step"
RESTARTED = "machine_restarted"  # journal event: the lost machine came back; the run goes on there
BUDGET_END = "budget_end"  # journal event: no offer the money left can finish on
RESTART_WAIT_S = 300.0  # how long a lost machine holding a newer checkpoint is tried again
RESTART_POLL_S = 30.0
RESUME_PREFIX = "flux-remote-resume-"  # the checkpoint's name in the new machine's dataset folder


def continues(spec: "RunSpec") -> bool:
    """Whether a lost machine is replaced: rented machines only (own hardware is not rented)."""
    return spec.provider.type == "vast" and spec.gpu.on_lost == "continue"


def row_usd(row: dict[str, Any], now: float) -> float:
    """What one instance row billed: ``dph_total`` from billing start to its destroy (or now,
    for a row not destroyed yet: a stopped instance still bills its storage)."""
    started = row.get("billing_started_at")
    if started is None:
        return 0.0
    ended = now if row.get("destroyed_at") is None else row["destroyed_at"]
    return max(0.0, float(ended) - float(started)) / 3600.0 * float(row.get("dph_total") or 0.0)


def earlier_machines_usd(journal: "Journal", run_id: str, now: float, *,
                         current_row: int | None = None) -> float:
    """Dollars of the run's machines other than the current one (``current_row``, else the
    journal's current instance), bandwidth apart."""
    current = journal.current_instance(run_id) if current_row is None else {"id": current_row}
    current_id = current["id"] if current is not None else None
    return sum(row_usd(row, now) for row in journal.instances(run_id) if row["id"] != current_id)


def machines(journal: "Journal", run_id: str, now: float) -> list[dict[str, Any]]:
    """Every machine the run billed on, in order, with what each cost (for the receipt)."""
    return [{"instance_id": row.get("instance_id"), "gpu_name": row.get("gpu_name"),
             "offer_id": row.get("offer_id"), "price_per_hour": float(row.get("dph_total") or 0),
             "billing_started_at": row.get("billing_started_at"),
             "ended_at": now if row.get("destroyed_at") is None else row["destroyed_at"],
             "state": row.get("state"), "usd": round(row_usd(row, now), 6)}
            for row in journal.instances(run_id) if row.get("billing_started_at") is not None]


def continuation(journal: "Journal", run_id: str) -> dict[str, Any] | None:
    """The newest ``continue`` event's detail when it is the run's latest move (a restart of the
    lost machine afterwards supersedes it), else None."""
    for event in reversed(journal.events(run_id)):
        if event["kind"] == RESTARTED:
            return None
        if event["kind"] == CONTINUE:
            return dict(event["detail"])
    return None


def verified_home_checkpoint(journal: "Journal", run: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint at home that loads as a LoRA of the run's rank, else None.

    It came from an untrusted machine: ``remote.validate.validate_lora`` checks keys, shapes,
    NaN and its step before it is shipped to the next one. A bf16 LoRA (ai-toolkit's usual save
    dtype) needs torch to be read; without torch on this machine only its header is checked
    (:func:`header_report`), and the agent checks it again in full before training from it."""
    home = fetched_checkpoint(journal, run["run_id"])
    if home is None:
        return None
    from remote.resume import run_rank
    from remote.validate import validate_lora

    rank = run_rank(json.loads(run["spec_json"]))
    try:
        report = validate_lora(Path(home["local"]), rank=rank)
    except ImportError:
        report = header_report(Path(home["local"]), rank=rank)
    if report["problems"]:
        journal.add_event(run["run_id"], "checkpoint_rejected",
                          {"local": home["local"], "problems": report["problems"][:5]})
        return None
    return {**home, "step": int(report["step"] or home.get("step") or 0)}


def header_report(path: Path, *, rank: int) -> dict[str, Any]:
    """What a safetensors header says of a LoRA, without reading its tensors: PEFT
    ``lora_A``/``lora_B`` pairs of ``rank``, data offsets inside the file, the step in its
    ``training_info`` metadata. Same shape of report as ``validate_lora`` (problems, step)."""
    problems: list[str] = []
    step = None
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
        end = path.stat().st_size - 8 - size
    except (OSError, ValueError) as exc:
        return {"problems": [f"{path.name} is not a safetensors file: {exc}"], "step": None}
    if not isinstance(header, dict):
        return {"problems": [f"{path.name} is not a safetensors file"], "step": None}
    shapes: dict[str, dict[str, list[int]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        base, _, ab = key.removesuffix(".weight").rpartition(".lora_")
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if ab not in ("A", "B") or not key.endswith(".weight") or not offsets \
                or not all(isinstance(o, int) and 0 <= o <= end for o in offsets):
            problems.append(f"unexpected tensor {key}")
            continue
        shapes.setdefault(base, {})[ab] = list(info.get("shape") or [])
    for base, pair in shapes.items():
        down, up = pair.get("A") or [], pair.get("B") or []
        if len(down) < 2 or len(up) < 2 or down[0] != up[1] or down[0] != rank:
            problems.append(f"{base}: lora_A {down} / lora_B {up} is not a rank-{rank} pair")
    try:
        step = int(json.loads((header.get("__metadata__") or {})["training_info"])["step"])
    except (KeyError, ValueError, TypeError):
        problems.append("metadata training_info does not name the step")
    if not shapes:
        problems.append("the file holds no LoRA tensors")
    return {"problems": problems, "step": step}


def _newer_on_machine(seen: str | None, home: dict[str, Any] | None) -> bool:
    """The last status named a checkpoint that is not the one at home."""
    from remote.progress import checkpoint_step

    if not seen:
        return False
    if home is None:
        return True
    step = checkpoint_step(seen)
    return seen != home.get("path") and (step is None or step > int(home.get("step") or 0))


def after_loss(orch: "Orchestrator", run: dict[str, Any], exc: "MachineLost", *,
               seen_checkpoint: str | None = None) -> None:
    """Release the lost machine (after trying to restart it when it holds the only copy of a
    newer checkpoint) and leave the run ``renting`` (a new machine) or ``shipping`` (the old one
    came back); ``orch.drive`` carries on from there."""
    run_id = run["run_id"]
    journal = orch.journal
    run = journal.get_run(run_id) or run  # as the follow left it: the step it was lost at
    home = verified_home_checkpoint(journal, run)
    orch.reporter.note(f"{exc}; the run continues (gpu.on_lost: continue)")
    lost = journal.current_instance(run_id)
    if _newer_on_machine(seen_checkpoint, home) and not (
            lost is not None and untrusted_machine(journal, lost.get("instance_id"))) and \
            _try_restart(orch, run, seen_checkpoint):
        return
    orch.forget_machine(run_id)
    step = int(home["step"]) if home else 0
    # Decided and journaled before the destroy: a controller killed in between resumes in
    # `renting`, where the old machine is reattached or released before anything is rented.
    journal.add_event(run_id, CONTINUE, {
        "step": step, "local": home["local"] if home else None,
        "lost_at_step": run.get("step"), "reason": str(exc).splitlines()[0]})
    journal.update_run(run_id, state=R.RENTING, log_offset=0, stop_requested=0,
                       remote_run_dir=None, error=None)
    orch.provider.release(run_id, journal)
    where = f"the checkpoint of step {step} at home" if home else "step 0 (no checkpoint home)"
    orch.reporter.note(f"renting the next machine; training resumes from {where}")


def _try_restart(orch: "Orchestrator", run: dict[str, Any], seen: str | None) -> bool:
    """Stop the lost instance (its disk is kept) and start it again, every ``RESTART_POLL_S``
    (``orch.sleep``) for ``RESTART_WAIT_S`` (by attempts, and by ``orch.clock`` when one start
    waits long under the provider's readiness deadlines). An outbid Vast instance stays stopped
    until its bid wins again (vast-cli ``vastai/SKILL.md``: "When outbid, the instance moves to
    `stopped`"), so this usually fails."""
    from controller.run.states import spec_of

    run_id = run["run_id"]
    orch.reporter.note(f"the lost machine holds a newer checkpoint ({seen}) than the one at "
                       f"home: keeping it and trying to start it again")
    orch.forget_machine(run_id)
    try:
        orch.provider.release(run_id, orch.journal, keep_data=True)
    except FluxRemoteError as exc:
        orch.reporter.note(f"stopping it failed ({exc})")
        return False
    tries = max(1, int(RESTART_WAIT_S // RESTART_POLL_S))
    deadline = orch.clock() + RESTART_WAIT_S
    for attempt in range(1, tries + 1):
        try:
            machine = orch.provider.reattach(run_id, spec_of(run), orch.journal)
        except (ProviderError, TransportError) as exc:
            if attempt == tries or orch.clock() >= deadline:
                orch.journal.add_event(run_id, "restart_failed", {"error": str(exc)})
                orch.reporter.note(f"it did not come back ({exc}); its newer checkpoint is "
                                   "given up")
                return False
            orch.sleep(RESTART_POLL_S)
            continue
        orch.adopt_machine(run_id, machine)
        orch.journal.add_event(run_id, RESTARTED, {"instance_id": machine.info.get(
            "instance_id"), "checkpoint": seen})
        orch.journal.update_run(run_id, state=R.SHIPPING, stop_requested=0)
        orch.reporter.note("the machine is back; the agent resumes from its newest checkpoint")
        return True
    return False


def remaining_spec(spec: "RunSpec", *, step: int, money_left: float) -> "RunSpec":
    """The spec of what is left to do: the steps after ``step``, within ``money_left``."""
    data = spec.model_dump(mode="json")
    data["training"]["steps"] = max(1, spec.training.steps - step)
    data["budget"]["max_usd"] = max(money_left, 1e-6)
    return type(spec).model_validate(data)


def money_left(orch: "Orchestrator", run: dict[str, Any]) -> float:
    """The budget minus every earlier machine and all bandwidth (the current machine apart)."""
    spent = earlier_machines_usd(orch.journal, run["run_id"], orch.clock())
    return float(run["budget_usd"]) - spent - orch.bandwidth_usd(run["run_id"])


def acquire_next(orch: "Orchestrator", run: dict[str, Any], spec: "RunSpec",
                 notify: Any) -> "Machine | None":
    """Rent the machine the rest of the run goes on; None when the money left fits no offer
    (the run then ended ``budget``: ``budget_end``)."""
    detail = continuation(orch.journal, run["run_id"]) or {}
    left = money_left(orch, run)
    step = int(detail.get("step") or 0)
    rest = remaining_spec(spec, step=step, money_left=left)
    try:
        estimate: "Estimate" = orch.provider.estimate(rest)
    except BudgetError as exc:
        topped = _top_up(orch, run, spec, step, left)
        if topped is None:
            _end_for_budget(orch, run, detail, left, exc)
            return None
        left, rest, estimate = topped
    orch.journal.add_event(run["run_id"], "estimate", {**estimate.to_dict(), "rest": True,
                                                       "money_left": left})
    return orch.provider.acquire(run["run_id"], rest, estimate, orch.journal, notify)


def _top_up(orch: "Orchestrator", run: dict[str, Any], spec: "RunSpec", step: int,
            left: float) -> "tuple[float, RunSpec, Estimate] | None":
    """In a batch (``Orchestrator.purse``): when the money left cannot pay the next machine (a
    run that started on a machine already set up reserved no setup), ask the batch's ledger for
    what the rest needs beyond it. Returns ``(money left, the rest's spec, its estimate)`` once
    granted (the run's budget is raised by as much in the journal), else None."""
    purse = orch.purse
    if purse is None:
        return None
    more = purse.available()
    if more <= 0:
        return None
    try:
        estimate = orch.provider.estimate(remaining_spec(spec, step=step, money_left=left + more))
    except BudgetError:
        return None
    need = max(0.0, float(estimate.est_usd or 0.0) * (1 + spec.budget.safety_margin) - left)
    if need > more or not purse.grant(run["run_id"], need):
        return None
    left += need
    budget = float((orch.journal.get_run(run["run_id"]) or run)["budget_usd"]) + need
    orch.journal.update_run(run["run_id"], budget_usd=budget)  # the follower's and agent's cap
    orch.journal.add_event(run["run_id"], "budget_top_up", {"usd": need, "money_left": left,
                                                            "budget_usd": budget})
    return left, remaining_spec(spec, step=step, money_left=left), estimate


def _end_for_budget(orch: "Orchestrator", run: dict[str, Any], detail: dict[str, Any],
                    left: float, exc: BudgetError) -> None:
    local = detail.get("local")
    result = (f"the newest checkpoint at home is the result: {local} (step {detail.get('step')})"
              if local else "no checkpoint came home")
    message = (f"budget: ${left:.2f} left cannot finish the remaining steps on any offer "
               f"({exc}); {result}")
    orch.journal.add_event(run["run_id"], BUDGET_END, {"money_left": left, "local": local,
                                                       "step": detail.get("step")})
    orch.journal.update_run(run["run_id"], state=R.BUDGET, error=message,
                            ended_at=orch.clock())
    orch.reporter.note(message)


def plan_spec(orch: "Orchestrator", run: dict[str, Any], machine: "Machine") -> dict[str, Any]:
    """The spec that goes into the machine's ``plan.json``: the journaled one, with the agent's
    cap lowered to the money left, ``save_every`` chosen for a bid machine (when the spec leaves
    it open), and after a loss ``resume_from_checkpoint`` naming the shipped checkpoint."""
    spec = json.loads(run["spec_json"])
    if earlier_machines_usd(orch.journal, run["run_id"], orch.clock()) > 0:
        spec["budget"]["max_usd"] = max(money_left(orch, run), 1e-6)
    if spec["training"].get("save_every") is None and machine.info.get("save_every"):
        spec["training"]["save_every"] = int(machine.info["save_every"])
    detail = continuation(orch.journal, run["run_id"])
    if detail and detail.get("local"):
        spec["training"]["resume_from_checkpoint"] = resume_name(detail)
    return spec


def resume_name(detail: dict[str, Any]) -> str:
    return f"{RESUME_PREFIX}{int(detail.get('step') or 0):09d}.safetensors"


def ship_checkpoint(orch: "Orchestrator", run: dict[str, Any], machine: "Machine",
                    dataset_dir: str) -> Any:
    """After a loss, upload the checkpoint at home into the new machine's dataset folder (after
    the dataset itself: its ``--delete`` would remove it). Returns the transfer stats or None."""
    detail = continuation(orch.journal, run["run_id"])
    if not detail or not detail.get("local"):
        return None
    return machine.host.upload(Path(detail["local"]), f"{dataset_dir}/{resume_name(detail)}")
