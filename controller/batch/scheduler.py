"""Batches: many runs under one total budget, up to ``max_parallel`` machines at once.

The batch's slots are journaled by :func:`~controller.batch.setup.create_batch`. The
:class:`BatchScheduler` then loops: collect runs that ended, meter the spend of those running,
start what fits. Starting a slot means: estimate it (Vast: plan the offers nobody in the batch
has taken; measured s/step from runs already finished feed that plan), reserve the estimate plus
its safety margin in the :class:`~controller.batch.ledger.Ledger`, and launch it with its budget
lowered to that reservation, so the controller's meter and the agent's cost guard keep the batch
under its total. A slot whose reservation does not fit is started later if running runs may
still give money back, else it is ``skipped: budget``.

With ``batch.reuse_machines`` a run that ended well gives its machine to the first pending slot
of the same :func:`~controller.planning.reuse.machine_key` whose warm reservation fits
(:meth:`BatchScheduler._offer_machine`, called from that run's thread through
``controller.run.handover``), and a new machine is started only when it leaves the money the
other pending runs of its key need warm (:meth:`BatchScheduler._room_for_warm_runs`). A run whose
lost machine's successor needs more than its reservation may take it from the ledger
(:class:`LedgerPurse`).

Each run is driven by its own :class:`~controller.run.orchestrator.Orchestrator` in a thread (a
run's drive mostly waits). One run failing never stops the others; an infrastructure failure (no
machine, a host that died or failed its checks) is retried on another offer up to
``batch.retries`` times; a failed quality gate, a bad spec or a crashed trainer is not.

Everything is journaled (``batches`` and ``batch_runs``, plus the runs themselves), so a
controller killed mid-batch is followed by ``resume BATCH``: running runs are reattached (never
rented again), the ledger is rebuilt from the journal, and the remaining slots are started.

Slot states: ``pending -> active -> done | failed | stopped``, or ``skipped``
(:mod:`controller.batch.setup`). A stop of the batch (:mod:`controller.batch.stop`) is re-read
after a slot is claimed and again right before its run's machine is rented. The live view reads
the :class:`~controller.batch.board.BatchBoard`.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from controller.run import states as R
from controller.batch.board import BatchBoard
from controller.batch.setup import (ACTIVE, PENDING, SKIPPED, batch_ledger, batch_rows,
                                    slot_spec)
from controller.batch.stop import StopGate, StoppedBeforeStart, stop_reason
from controller.errors import (BudgetError, FluxRemoteError, ProviderError, RunError,
                               SpecError, TransportError)
from controller.run.follow import MachineLost
from controller.batch.ledger import run_reservation
from controller.run.handover import Taker
from controller.run.orchestrator import Options, Orchestrator, Purse
from controller.providers.vast import OfferClaims
from controller.run.states import run_lock, spec_of
from controller.journal import INSTANCE_HANDED_OVER
from controller.planning.reuse import machine_key, warm_estimate
from controller.batch.packs import Packs
from controller.journal import seat_of

if TYPE_CHECKING:
    from controller.providers.base import Machine
    from controller.run.handover import HandOver
    from controller.spec.model import RunSpec
    from controller.vast.client import VastClient
    from controller.journal import Journal
    from controller.providers.base import Estimate, Provider

BATCH_RUNNING, BATCH_DONE, BATCH_PARTIAL = "running", "done", "partial"
# Agent causes that say the host, not the run, was at fault (``remote.runner``): retried.
INFRA_CAUSES = ("checks", "bootstrap_command", "disk_full")
INFRA_ERRORS = (ProviderError, TransportError, MachineLost)

ProviderFactory = Callable[[str, OfferClaims], "Provider"]


def classify_failure(run: dict[str, Any] | None, exc: BaseException | None) -> str:
    """``infra`` (retry on another machine) or ``run`` (the run itself is at fault: never)."""
    if isinstance(exc, (SpecError, BudgetError)):
        return "run"
    if isinstance(exc, INFRA_ERRORS):
        return "infra"
    error = str((run or {}).get("error") or "")
    if any(f"(cause: {cause})" in error for cause in INFRA_CAUSES):
        return "infra"
    if "gone without an exit code" in error or "machine is gone" in error:
        return "infra"
    return "run"


# ---- the scheduler --------------------------------------------------------------------------

@dataclass
class BatchOptions:
    poll_interval: float = 2.0  # each run's agent polls
    tick_s: float = 0.5  # how often the scheduler looks at the batch
    finish_allowance_s: float | None = None  # None: the orchestrator's default
    lost_contact_s: float | None = None

    def run_options(self, hand_over: "HandOver | None" = None,
                    purse: "Purse | None" = None) -> Options:
        extra: dict[str, Any] = {"hand_over": hand_over, "purse": purse}
        if self.finish_allowance_s is not None:
            extra["finish_allowance_s"] = self.finish_allowance_s
        if self.lost_contact_s is not None:
            extra["lost_contact_s"] = self.lost_contact_s
        return Options(poll_interval=self.poll_interval, **extra)


@dataclass
class BatchResult:
    batch_id: str
    state: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    summary_path: str | None = None
    report_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == BATCH_DONE

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "batch_id": self.batch_id, "state": self.state,
                "ledger": self.ledger, "summary": self.summary_path, "report": self.report_path,
                "runs": self.rows}


class LedgerPurse:
    """The batch's ledger as a run's purse: a run whose lost machine's successor needs more
    than its reservation (``controller.run.relaunch``) may take it from what the batch has left;
    the total is never passed."""

    def __init__(self, scheduler: "BatchScheduler") -> None:
        self.scheduler = scheduler

    def available(self) -> float:
        return max(0.0, self.scheduler.ledger.remaining())

    def grant(self, run_id: str, usd: float) -> bool:
        sched = self.scheduler
        with sched._lock:
            entry = sched.ledger.entry(run_id)
            if entry is None or not entry.open:
                return False
            reserved = entry.reserved + usd
            if not sched.ledger.try_reserve(run_id, reserved):
                return False
            sched.journal.add_event(run_id, "ledger_reserve", {
                "batch_id": sched.batch_id, "reserved_usd": reserved, "top_up_usd": usd,
                "remaining_usd": sched.ledger.remaining()})
            return True


class BatchScheduler:
    """Runs one batch to its end (or, after a crash, from where the journal says it is)."""

    def __init__(self, journal: "Journal", batch_id: str, *,
                 provider_factory: ProviderFactory | None = None, board: BatchBoard | None = None,
                 options: BatchOptions | None = None, env: Mapping[str, str] | None = None,
                 on_tick: Callable[["BatchScheduler"], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        batch = journal.get_batch(batch_id)
        if batch is None:
            raise RunError(f"no batch {batch_id!r} in the journal", hint="see `flux-remote ls`")
        self.journal = journal
        self.batch = batch
        self.batch_id = batch_id
        self.provider_factory = provider_factory or self._default_factory
        self.board = board or BatchBoard()
        self.options = options or BatchOptions()
        self.env = env
        self.on_tick = on_tick
        self.clock = clock
        self.sleep = sleep
        self.claims = OfferClaims()
        self._vast_client: "VastClient | None" = None
        self.ledger = batch_ledger(journal, batch)
        self._ended: "queue.Queue[tuple[int, str, BaseException | None]]" = queue.Queue()
        self._threads: dict[int, threading.Thread] = {}
        self._waiting: set[int] = set()  # slots that did not fit: tried again once a run ends
        self._stops_sent: set[str] = set()  # runs this process wrote a deferred STOP for
        # Slots are claimed from the loop and, when a run hands its machine over, from that
        # run's thread: one claim at a time.
        self._lock = threading.RLock()
        self._estimates: dict[str, "Estimate"] = {}  # run id -> the estimate it was started on
        self.packs = Packs(self)  # several runs at once on one multi-GPU instance

    def _default_factory(self, name: str, claims: OfferClaims) -> "Provider":
        from controller.providers import provider_named

        if name != "vast":
            return provider_named(name, journal=self.journal)
        if self._vast_client is None:  # one client for the batch: Vast's limits are per account
            from controller.vast.client import VastClient

            self._vast_client = VastClient()
        return provider_named(name, journal=self.journal, offer_claims=claims,
                              client=self._vast_client)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> BatchResult:
        """Drive every slot to an end; returns the batch's result (the summary is written)."""
        with run_lock(self.journal, self.batch_id):
            self.journal.update_batch(self.batch_id, state=BATCH_RUNNING)
            self._recover()
            while True:
                self._collect()
                self._meter()
                self._deferred_stops()
                self._start_what_fits()
                if self.on_tick is not None:
                    self.on_tick(self)
                if not self._threads and not self.pending():
                    break
                try:  # sleep until a run ends or the next tick, whichever comes first
                    ended = self._ended.get(timeout=self.options.tick_s)
                except queue.Empty:
                    continue
                self._ended.put(ended)  # collected at the top of the next round
            return self._finish()

    def slots(self) -> list[dict[str, Any]]:
        return self.journal.batch_runs(self.batch_id)

    def pending(self) -> list[dict[str, Any]]:
        return [s for s in self.slots() if s["state"] == PENDING]

    def _recover(self) -> None:
        """After a crash: adopt runs created for pending slots, reattach active ones, and mark
        the offers their machines hold as taken."""
        runs = self.journal.runs_of_batch(self.batch_id)
        holding = {r["run_id"] for r in runs if not self._frees_offer(r["run_id"], r["state"])}
        for row in self.journal.instances():
            if row["run_id"] in holding and row.get("offer_id"):
                self.claims.claim(row["offer_id"])
        for slot in self.slots():
            if slot["state"] == PENDING:
                mine = [r for r in runs if r["name"] == slot["name"]
                        and r["state"] in R.ACTIVE_STATES]
                if mine:
                    self.journal.update_batch_run(self.batch_id, slot["idx"], state=ACTIVE,
                                                  run_id=mine[-1]["run_id"])
                    slot = {**slot, "state": ACTIVE, "run_id": mine[-1]["run_id"]}
            if slot["state"] == ACTIVE and slot["run_id"] and self._never_started(slot):
                continue  # pending again: claimed afresh (a new estimate and reservation)
            if slot["state"] == ACTIVE and slot["run_id"]:
                self.spawn(slot, slot["run_id"], None)

    def _never_started(self, slot: dict[str, Any]) -> bool:
        """A slot claimed by a controller that stopped before its run rented or took over
        anything (``planned``, no instance row): its claim may have been priced warm for a
        machine it never got, so the run is closed and the slot is pending again."""
        run_id = slot["run_id"]
        run = self.journal.get_run(run_id) or {}
        if run.get("state") != R.PLANNED or self.journal.instances(run_id):
            return False
        self.journal.update_run(run_id, state=R.FAILED, ended_at=self.clock(),
                                error="claimed by the batch, never started (its controller "
                                      "stopped first); the slot was started again")
        self.ledger.close(run_id, 0.0)
        self.journal.update_batch_run(self.batch_id, slot["idx"], state=PENDING, run_id=None,
                                      attempts=max(0, int(slot["attempts"]) - 1))
        return True

    def _collect(self) -> None:
        """Runs that ended: close their ledger entry, settle their slot (maybe retry it)."""
        with self._lock:
            self._collect_ended()

    def _collect_ended(self) -> None:
        while True:
            try:
                idx, run_id, exc = self._ended.get_nowait()
            except queue.Empty:
                return
            self._threads.pop(idx, None)
            self._waiting.clear()  # money or offers may have come back
            run = self.journal.get_run(run_id) or {}
            slot = next(s for s in self.slots() if s["idx"] == idx)
            state = run.get("state") or R.FAILED
            if state not in R.ACTIVE_STATES:
                self.ledger.close(run_id, float(run.get("spend_usd") or 0.0))
            if self._frees_offer(run_id, state):  # a failed host's offer stays out of the batch
                for row in self.journal.instances(run_id):
                    if row.get("offer_id") and row["state"] != INSTANCE_HANDED_OVER:
                        self.claims.release(row["offer_id"])
            if state == R.FAILED and classify_failure(run, exc) == "infra" \
                    and slot["attempts"] <= int(self.batch["retries"]):
                self.board.note(slot["name"], f"infrastructure failure; retrying on another "
                                              f"machine ({run.get('error') or exc})")
                self.journal.update_batch_run(self.batch_id, idx, state=PENDING,
                                              note=f"retry after: {run.get('error') or exc}")
                continue
            if state in R.ACTIVE_STATES:  # another process drives it: `resume BATCH` later
                self.journal.update_batch_run(self.batch_id, idx, note=str(exc or ""))
                continue
            note = None if state == R.DONE else (run.get("error") or str(exc or "") or None)
            self.journal.update_batch_run(self.batch_id, idx, state=state, note=note)

    def _frees_offer(self, run_id: str, state: str) -> bool:
        """An ended run whose host did not fail gives its offer back to the batch; a run the
        budget ended does once its machine is gone (a stopped one still holds its disk)."""
        if state == R.BUDGET:
            return self.journal.current_instance(run_id) is None
        return state in (R.DONE, R.STOPPED)

    def _meter(self) -> None:
        self.packs.meter_idle()
        for slot in self.slots():
            if slot["state"] == ACTIVE and slot["run_id"]:
                run = self.journal.get_run(slot["run_id"]) or {}
                self.ledger.meter(slot["run_id"], float(run.get("spend_usd") or 0.0))

    def _deferred_stops(self) -> None:
        """``stop BATCH`` from another process could not stop a run whose agent had not started
        yet (this process drives it): write its STOP here once it runs."""
        for slot in self.slots():
            run_id = slot["run_id"]
            if slot["state"] != ACTIVE or not run_id or run_id in self._stops_sent:
                continue
            run = self.journal.get_run(run_id) or {}
            if run.get("state") != R.RUNNING or not self.journal.events(run_id, "stop_deferred"):
                continue
            self._stops_sent.add(run_id)
            provider = self.provider_factory(run.get("provider") or "local", self.claims)
            try:
                Orchestrator(self.journal, provider, env=self.env, clock=self.clock,
                             sleep=self.sleep).request_stop(run_id)
            except FluxRemoteError as exc:
                self.board.note(slot["name"], f"could not write its STOP: {exc}")

    def _start_what_fits(self) -> None:
        with self._lock:
            self.packs.open_seats()
            alive, promised = self._machines_alive(), self.packs.promised()
            skipped: dict[str, int] = {}
            for slot in self.pending():
                if alive >= int(self.batch["max_parallel"]):
                    return
                key = machine_key(slot_spec(slot))
                # a seat of a machine being set up (a pack started this round too) waits for it
                if skipped.get(key, 0) < promised.get(key, 0):
                    skipped[key] = skipped.get(key, 0) + 1
                    continue
                if slot["idx"] not in self._waiting:
                    self._try_start(slot)  # may start a machine, or a pack that promises seats
                    alive, promised = self._machines_alive(), self.packs.promised()

    def _machines_alive(self) -> int:
        """Machines the batch holds now (``max_parallel`` counts machines, not runs): one per
        running run, except that the runs on the seats of one multi-GPU instance count once,
        and a pack's instance counts while any seat is alive."""
        machines = self.packs.instances_alive()
        for slot in self.slots():
            if slot["idx"] not in self._threads or not slot["run_id"]:
                continue
            row = self.journal.current_instance(slot["run_id"])
            shared = row is not None and row.get("instance_id") and seat_of(row)
            machines.add(f"instance:{row['instance_id']}" if shared else f"run:{slot['run_id']}")
        return len(machines)

    def _try_start(self, slot: dict[str, Any]) -> None:
        reason = stop_reason(self.journal, self.batch_id)
        if reason is not None:  # e.g. a retry set pending after the stop
            self.journal.update_batch_run(self.batch_id, slot["idx"], state=R.STOPPED,
                                          note=reason)
            return
        spec = slot_spec(slot)
        provider = self.provider_factory(spec.provider.type, self.claims)
        try:
            estimate = provider.estimate(spec)
        except BudgetError as exc:
            if not self._threads:  # else offers the running runs hold may come back
                self._skip(slot, f"skipped: budget ({exc})")
            self._waiting.add(slot["idx"])
            return
        except FluxRemoteError as exc:
            if self._threads:
                self._waiting.add(slot["idx"])
                return  # the provider may answer later; running runs keep the batch alive
            self.journal.update_batch_run(self.batch_id, slot["idx"], state=R.FAILED,
                                          note=f"could not estimate: {exc}")
            return
        pack = self.packs.choose(spec, estimate, provider)
        if pack is not None:
            estimate = pack.lead
        elif not self._room_for_warm_runs(slot, spec, estimate):
            self._waiting.add(slot["idx"])  # a running machine takes it, warm, when it ends
            return
        run_id = self.claim(slot, spec, estimate, provider)
        if run_id is not None and pack is not None:
            self.packs.start(run_id, spec, pack)
        if run_id is None:
            if not self._threads:  # nothing running can give money back
                amount = run_reservation(estimate, spec)
                self._skip(slot, f"skipped: budget (needs ${amount:.2f}, "
                                 f"${max(0.0, self.ledger.remaining()):.2f} left of "
                                 f"${self.ledger.total_usd:.2f})")
            self._waiting.add(slot["idx"])
            return
        # Claimed: a stop from now on sees the run. One that came since the slot was read as
        # pending (its cancel was just overwritten, or is about to be) is honoured here.
        reason = stop_reason(self.journal, self.batch_id)
        if reason is not None:
            self._not_started(slot, run_id, reason)
            return
        self.spawn({**slot, "attempts": int(slot["attempts"]) + 1}, run_id, estimate, provider)

    def _room_for_warm_runs(self, slot: dict[str, Any], spec: "RunSpec",
                            estimate: "Estimate") -> bool:
        """Whether a new machine for ``slot`` still leaves the money the batch's other pending
        runs of its machine key need on a machine already set up (each priced like this one,
        warm). When it does not and a machine is running, the slot waits for that machine: a
        second setup must not cost runs that one machine could have finished."""
        if not self.batch.get("reuse_machines") or not self._threads:
            return True
        key = machine_key(spec)
        others = sum(1 for s in self.pending()
                     if s["idx"] != slot["idx"] and machine_key(slot_spec(s)) == key)
        if not others:
            return True
        cold = run_reservation(estimate, spec)
        warm = run_reservation(warm_estimate(estimate), spec)
        return self.ledger.remaining() - cold >= others * warm

    def claim(self, slot: dict[str, Any], spec: "RunSpec", estimate: "Estimate",
               provider: "Provider") -> str | None:
        """Reserve the slot's estimate in the ledger and journal its run (``planned``); None
        when the reservation does not fit."""
        from controller.spec.model import RunSpec

        amount = run_reservation(estimate, spec)
        key = f"slot-{slot['idx']}"
        if not self.ledger.try_reserve(key, amount):
            return None
        # The run's own cap: its reservation; free hardware reserves nothing and keeps its
        # budget, but never one above the batch's total.
        cap = amount if amount > 0 else min(spec.budget.max_usd, self.ledger.total_usd)
        capped = spec
        if cap < spec.budget.max_usd:
            data = spec.model_dump(mode="json")
            data["budget"]["max_usd"] = cap
            capped = RunSpec.model_validate(data)
        out_dir = Path(self.batch["out_dir"]) / spec.name
        orch = Orchestrator(self.journal, provider, env=self.env, clock=self.clock,
                            sleep=self.sleep)
        run_id = orch.create_run(capped, estimate, out_dir=out_dir, batch_id=self.batch_id,
                                 spec_path=Path(self.batch["spec_path"])
                                 if self.batch["spec_path"] else None)
        self.ledger.rename(key, run_id)
        self._estimates[run_id] = estimate
        self.journal.add_event(run_id, "ledger_reserve", {
            "batch_id": self.batch_id, "reserved_usd": amount, "est_usd": estimate.est_usd,
            "remaining_usd": self.ledger.remaining()})
        self.journal.update_batch_run(self.batch_id, slot["idx"], state=ACTIVE, run_id=run_id,
                                      attempts=int(slot["attempts"]) + 1)
        return run_id

    def unclaim(self, slot: dict[str, Any], run_id: str, error: str) -> None:
        """A claimed run that could not get the machine it was claimed for: it ends ``failed``
        (nothing spent), its reservation goes back and its slot is pending again."""
        self.journal.update_run(run_id, state=R.FAILED, ended_at=self.clock(), error=error)
        self.ledger.close(run_id, 0.0)
        self.journal.update_batch_run(self.batch_id, slot["idx"], state=PENDING, run_id=None,
                                      attempts=int(slot["attempts"]))

    # ---- machines handed from one run to the next --------------------------------------------

    def _offer_machine(self, run_id: str, machine: "Machine") -> Taker | None:
        """Called from a run's thread once it ended well: give its machine to the first pending
        slot with the same machine key whose warm estimate fits the ledger. Returns the run that
        took it (journaled as the machine's owner; its thread starts when the finished run calls
        ``Taker.start``), or None: the machine is destroyed."""
        with self._lock:
            if stop_reason(self.journal, self.batch_id) is not None:
                return None
            run = self.journal.get_run(run_id) or {}
            key = machine_key(spec_of(run))
            provider = self.provider_factory(run.get("provider") or "local", self.claims)
            for slot in self.pending():
                spec = slot_spec(slot)
                if machine_key(spec) != key:
                    continue
                estimate = warm_estimate(self._estimate_on(spec, run_id, machine, provider))
                seats = int(machine.info.get("seats") or 1)
                if seats > 1:  # one seat of a shared machine goes on
                    from controller.planning.packing import seat_estimate

                    estimate = seat_estimate(estimate, seats)
                taker = self.claim(slot, spec, estimate, provider)
                if taker is None:
                    continue  # a later slot may be cheaper
                try:
                    provider.hand_over(run_id, taker, self.journal)
                except Exception as exc:  # noqa: BLE001 - the slot must not stay claimed
                    self.unclaim(slot, taker, f"could not take over the machine: {exc}")
                    self.journal.add_event(run_id, "handover_failed", {"error": str(exc)})
                    return None
                self._waiting.discard(slot["idx"])
                self.board.note(slot["name"], f"takes over the machine of {run['name']} "
                                              f"(already set up)")
                return Taker(taker, self._starter({**slot, "attempts": int(slot["attempts"]) + 1},
                                                  taker, estimate, provider))
            return None

    def _starter(self, slot: dict[str, Any], run_id: str, estimate: "Estimate",
                 provider: "Provider") -> Callable[["Machine"], None]:
        def start(machine: "Machine") -> None:
            row = self.journal.current_instance(run_id)
            adopted = None
            if row is not None and str(row.get("instance_id")) == str(machine.info.get(
                    "instance_id", row.get("instance_id"))):
                adopted = replace(machine, instance_row=int(row["id"]),
                                  billing_started_at=float(row["billing_started_at"]),
                                  info={**machine.info, "restarted": False})
            with self._lock:  # the finished run's thread still counts until it is collected
                self.spawn(slot, run_id, estimate, provider, machine=adopted)
        return start

    def _estimate_on(self, spec: "RunSpec", from_run: str, machine: "Machine",
                     provider: "Provider") -> "Estimate":
        """The run's cold estimate on the machine it would take over: planned on that machine's
        own offer when the run before it was planned in this process, else by the provider."""
        from controller.planning.reuse import estimate_on_offer

        previous = self._estimates.get(from_run)
        offer_id = machine.info.get("offer_id")
        plan = getattr(previous, "plan", None)
        for planned in getattr(plan, "offers", None) or []:
            if str(planned.offer_id) == str(offer_id):
                return estimate_on_offer(spec, planned.offer,
                                         measured=self.journal.measured_s_per_step())
        return provider.estimate(spec)

    def _not_started(self, slot: dict[str, Any], run_id: str, reason: str) -> None:
        """A claimed slot whose batch was asked to stop before its run was spawned."""
        message = str(StoppedBeforeStart(reason))
        self.journal.update_run(run_id, state=R.STOPPED, error=message, ended_at=self.clock())
        self.ledger.close(run_id, 0.0)
        self.board.note(slot["name"], message)
        self.journal.update_batch_run(self.batch_id, slot["idx"], state=R.STOPPED, note=message)

    def _skip(self, slot: dict[str, Any], note: str) -> None:
        self.board.note(slot["name"], note)
        self.journal.update_batch_run(self.batch_id, slot["idx"], state=SKIPPED, note=note)

    def spawn(self, slot: dict[str, Any], run_id: str, estimate: "Estimate | None",
               provider: "Provider | None" = None, *, machine: "Machine | None" = None) -> None:
        run = self.journal.get_run(run_id) or {}
        provider = provider or self.provider_factory(run.get("provider") or "local", self.claims)
        orch = Orchestrator(self.journal, StopGate(provider, self.batch_id),
                            reporter=self.board.reporter(run_id, slot["name"]), env=self.env,
                            clock=self.clock, sleep=self.sleep)
        if machine is not None:  # handed over on its open connection by the run before it
            orch.adopt_machine(run_id, machine)
        thread = threading.Thread(target=self._drive, args=(orch, slot["idx"], run_id, estimate),
                                  name=f"batch-{slot['name']}", daemon=True)
        self._threads[slot["idx"]] = thread
        thread.start()

    def _drive(self, orch: Orchestrator, idx: int, run_id: str,
               estimate: "Estimate | None") -> None:
        """One run, in its thread; whatever happens, the scheduler hears of its end."""
        error: BaseException | None = None
        try:
            orch.drive(run_id, self.options.run_options(
                self._offer_machine if self.batch.get("reuse_machines") else None,
                LedgerPurse(self)), estimate)
        except StoppedBeforeStart as exc:  # the orchestrator marked it failed; nothing rented
            error = exc
            self.journal.update_run(run_id, state=R.STOPPED, error=str(exc))
        except FluxRemoteError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug in one run must not end the batch
            error = exc
            orch.reporter.note(f"internal error: {exc}\n{traceback.format_exc()}")
        try:
            if orch.state(run_id) in R.ACTIVE_STATES:  # it could not be carried to an end
                orch.down(run_id)
                self.journal.update_run(run_id, state=R.FAILED,
                                        error=f"ended by the batch after: {error}")
        except FluxRemoteError as exc:
            orch.reporter.note(f"could not release the machine: {exc}")
        finally:
            self._ended.put((idx, run_id, error))

    def _finish(self) -> BatchResult:
        from controller.batch.report import write_report

        self.packs.meter_idle()

        rows = batch_rows(self.journal, self.batch_id)
        ended = [row["slot_state"] for row in rows]
        state = BATCH_DONE if all(s == R.DONE for s in ended) else BATCH_PARTIAL
        self.journal.update_batch(self.batch_id, state=state, ended_at=self.clock())
        self.journal.add_event(None, "batch_end", {"batch_id": self.batch_id, "state": state,
                                                   "ledger": self.ledger.to_dict()})
        summary, report = write_report(self.journal, self.batch_id)
        return BatchResult(self.batch_id, state, rows, self.ledger.to_dict(), str(summary),
                           str(report))


def batch_result(journal: "Journal", batch_id: str) -> BatchResult:
    """The batch as the journal has it (``status BATCH``)."""
    batch = journal.get_batch(batch_id)
    if batch is None:
        raise RunError(f"no batch {batch_id!r}")
    return BatchResult(batch_id, batch["state"], batch_rows(journal, batch_id),
                       batch_ledger(journal, batch).to_dict())

