"""Stopping a whole batch, and the other commands on one (``stop``/``down BATCH``).

``stop``/``down BATCH`` (another process, any time) first journal the batch's stop request
(:func:`stop_reason` reads it), then cancel the pending slots (:func:`cancel_pending`). The
scheduler re-reads that request after it has claimed a slot (the slot is ``active`` and its run
exists, so a stop from then on sees the run) and again right before the run's machine is rented,
under the run's lock (:class:`StopGate`): a run never rents once its batch was asked to stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from controller.run import states as R
from controller.batch.setup import PENDING
from controller.errors import RunError

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.providers.base import Estimate, Provider

BATCH_STOP = "batch_stop"  # the event ``stop``/``down BATCH`` journal before anything else


# ---- the stop request -----------------------------------------------------------------------

class StoppedBeforeStart(RunError):
    """The batch was asked to stop after this run was claimed but before it rented a machine."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not started: the batch was asked to stop before it rented a machine "
                         f"({reason})")


def stop_reason(journal: "Journal", batch_id: str, run_id: str | None = None) -> str | None:
    """Why the batch (or, with ``run_id``, that run of it) was asked to stop; None if it was not.

    The stop is read from the journal each time (never cached): ``stop BATCH`` runs in another
    process while this one schedules."""
    for event in journal.events(None, BATCH_STOP):
        if event["detail"].get("batch_id") == batch_id:
            return str(event["detail"].get("note") or "the batch was asked to stop")
    if run_id is not None:
        for event in journal.events(run_id, "stop_deferred"):
            return str(event["detail"].get("reason") or "the run was asked to stop")
    return None


class StopGate:
    """The provider a batch's run is driven with: ``acquire`` first re-reads the stop request.

    The orchestrator calls ``acquire`` holding the run's lock, so this check is the last moment
    before money is spent; a stop landing after it finds the lock held and is deferred
    (``stop_deferred``: the scheduler writes the STOP once the agent runs)."""

    def __init__(self, inner: "Provider", batch_id: str) -> None:
        self._inner = inner
        self._batch_id = batch_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def acquire(self, run_id: str, spec: Any, estimate: "Estimate", journal: "Journal",
                notify: Callable[[str, str], None]) -> Any:
        reason = stop_reason(journal, self._batch_id, run_id)
        if reason is not None:
            raise StoppedBeforeStart(reason)
        return self._inner.acquire(run_id, spec, estimate, journal, notify)


# ---- commands on a whole batch --------------------------------------------------------------

def cancel_pending(journal: "Journal", batch_id: str, note: str) -> int:
    """Slots not started yet never will be (``stop`` / ``down`` of a batch); returns how many.

    The stop request is journaled first: a scheduler that read a slot as pending just before
    this marks it re-reads the request once it has claimed the slot (``stop_reason``)."""
    if stop_reason(journal, batch_id) is None:
        journal.add_event(None, BATCH_STOP, {"batch_id": batch_id, "note": note})
    count = 0
    for slot in journal.batch_runs(batch_id):
        if slot["state"] == PENDING:
            journal.update_batch_run(batch_id, slot["idx"], state=R.STOPPED, note=note)
            count += 1
    return count


def active_runs(journal: "Journal", batch_id: str) -> list[dict[str, Any]]:
    """The batch's runs that have not ended (each attempt)."""
    return [r for r in journal.runs_of_batch(batch_id) if r["state"] in R.ACTIVE_STATES]

