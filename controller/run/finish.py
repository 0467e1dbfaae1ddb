"""The last step of a run: bring its bundle home, verify it, let the machine go, settle the bill.

``finish`` runs when the agent has ended (state ``fetching``): fetch and verify the bundle (or,
without one, the newest checkpoint and logs), remove the secrets, then destroy the machine or, in
a batch, hand it to the next run (``controller.run.handover``); meter every machine row, write the
controller's receipt, set the run's final state, publish to the Hub. An unverifiable bundle
stops the instance instead of destroying it (``keep_for_later``). ``machine_gone`` ends a run
whose machine no longer exists (or went on to the batch's next run) from what is at home.

Functions of the :class:`~controller.run.orchestrator.Orchestrator` they are given, like
``controller.run.relaunch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.errors import FluxRemoteError, RunError, TransportError
from controller.run import handover, relaunch
from controller.run import states as R
from controller.run.fetch import (CONTROLLER_RECEIPT, bundle_of_run, controller_receipt,
                                  fetch_bundle, fetch_extras, has_bundle, train_stop_reason)
from controller.run.follow import RunPaths, meter, read_int, read_json
from controller.run.ship import remove_secrets
from controller.run.states import spec_of
from controller.untrusted import UntrustedInput, clean_text, number, text_field

if TYPE_CHECKING:
    from controller.providers.base import Machine
    from controller.run.handover import HandOver
    from controller.run.orchestrator import Options, Orchestrator, Outcome


def machine_gone(orch: "Orchestrator", run: dict[str, Any]) -> "Outcome":
    """The journal says the run's machine no longer exists (or went on to the batch's next
    run before this controller stopped): keep what is home, meter every machine row the run
    had to its end, end the run."""
    out_dir = Path(run["out_dir"])
    run_id = run["run_id"]
    metered = relaunch.earlier_machines_usd(orch.journal, run_id, orch.clock(),
                                            current_row=-1) + orch.bandwidth_usd(run_id)
    if metered > float(run.get("spend_usd") or 0.0):
        orch.journal.update_run(run_id, spend_usd=metered)
    try:
        verified = bundle_of_run(out_dir, run_id)
    except RunError:
        orch.set_state(run_id, R.FAILED, ended_at=orch.clock(),
                       error=run.get("error") or "the run's machine is gone and no verified "
                                                 "bundle is home")
    else:
        rows = orch.journal.instances(run_id)
        if rows and not (out_dir / CONTROLLER_RECEIPT).exists():
            from remote.plan import write_json_atomic

            ended = float(rows[-1].get("destroyed_at") or orch.clock())
            receipt = controller_receipt(
                run=orch.run_row(run_id), instance=rows[-1], status={}, destroyed_at=ended,
                spend_usd=max(metered, float(run.get("spend_usd") or 0.0)),
                bandwidth_usd=orch.bandwidth_usd(run_id), files_verified=verified)
            receipt["machines"] = relaunch.machines(orch.journal, run_id, ended)
            write_json_atomic(out_dir / CONTROLLER_RECEIPT, receipt)
        orch.set_state(run_id, R.DONE, bundle_path=str(out_dir), ended_at=orch.clock())
    return orch.outcome_of(orch.run_row(run_id))


def finish(orch: "Orchestrator", run: dict[str, Any],
           options: "Options | None" = None) -> "Outcome":
    """Fetch and verify the bundle, then destroy (or, in a batch, hand the machine to the
    next run); an unverifiable bundle stops instead."""
    run_id = run["run_id"]
    machine = orch.machine(run_id)
    host, paths = machine.host, orch.paths(run)
    out_dir = Path(run["out_dir"])
    spec = spec_of(run)
    status = read_json(host, paths.status) or {}
    agent_state = text_field(status.get("state")) or "failed"
    # the follow loop ended on unusable data from the instance: the run fails, with that error
    flagged = orch.journal.events(run_id, kind="untrusted_input")
    untrusted = flagged[-1]["detail"].get("error") if flagged else None
    extras: list[str] = []
    fetched = None
    if has_bundle(host, paths):
        orch.reporter.note(f"fetching the bundle into {out_dir}")
        try:
            fetched = fetch_bundle(host, paths, out_dir,
                                   max_bytes=spec.publish.max_bundle_mb << 20)
            orch.transfer_cost(run_id, machine, "down", fetched.stats)
        except (TransportError, RunError) as exc:
            return keep_for_later(orch, run, exc)
    extras = fetch_extras(host, paths, out_dir,
                          checkpoint=None if fetched else status.get("last_checkpoint"),
                          checkpoint_max_bytes=spec.publish.max_checkpoint_mb << 20)
    instance = orch.journal.get_instance(machine.instance_row)
    remove_secrets(host, machine.root, run_id)
    s_per_step = _safe_number(status.get("s_per_step"))
    if s_per_step and not untrusted and machine.info.get("gpu_name"):
        # before the machine goes on: the next run on it is planned with this speed
        orch.journal.record_s_per_step(machine.info["gpu_name"], s_per_step, run_id)
    reusable = handover.machine_reusable(status, bundle_home=fetched is not None,
                                         untrusted=bool(untrusted))
    hand_over = options.hand_over if options is not None and reusable else None
    taker = _let_go(orch, run_id, machine, paths, hand_over)
    if taker is not None:
        instance = orch.journal.get_instance(machine.instance_row) or instance
    destroyed_at = float((instance or {}).get("destroyed_at") or 0.0) if taker else 0.0
    destroyed_at = destroyed_at or orch.clock()
    # earlier machines of the run: offers given up during readiness and lost machines alike
    spend = relaunch.earlier_machines_usd(orch.journal, run_id, destroyed_at,
                                          current_row=machine.instance_row) + meter(
        machine.price_per_hour, machine.billing_started_at, destroyed_at,
        orch.bandwidth_usd(run_id))
    orch.journal.add_spend_sample(run_id, usd=spend, dph_total=machine.price_per_hour,
                                  bandwidth_usd=orch.bandwidth_usd(run_id))
    receipt = None
    if fetched is not None:
        receipt = controller_receipt(run=orch.run_row(run_id), instance=instance, status=status,
                                     destroyed_at=destroyed_at, spend_usd=spend,
                                     bandwidth_usd=orch.bandwidth_usd(run_id),
                                     files_verified=fetched.files_verified)
        from remote.plan import write_json_atomic

        receipt["machines"] = relaunch.machines(orch.journal, run_id, destroyed_at)
        if taker is not None:
            receipt["handed_over_to"] = taker
        write_json_atomic(out_dir / CONTROLLER_RECEIPT, receipt)
    if untrusted:
        orch.set_state(run_id, R.FAILED, error=untrusted, ended_at=orch.clock(),
                       **({"bundle_path": str(out_dir)} if fetched is not None else {}))
    elif fetched is not None and agent_state in ("done", "stopped"):
        final = R.DONE if agent_state == "done" else R.stopped_state(
            cap_stopped=bool(orch.journal.events(run_id, kind="cap_stop")),
            stop_reason=train_stop_reason(status))
        orch.set_state(run_id, final, bundle_path=str(out_dir), ended_at=orch.clock())
        _publish_to_hub(orch, run_id, out_dir)
    else:
        orch.set_state(run_id, R.FAILED, error=_agent_error(host, paths, status),
                       ended_at=orch.clock())
    return orch.outcome_of(orch.run_row(run_id), receipt=receipt, extras=extras)


def _let_go(orch: "Orchestrator", run_id: str, machine: "Machine", paths: RunPaths,
            hand_over: "HandOver | None") -> str | None:
    """Hand the machine to the batch's next run when there is a taker; else destroy it.
    Returns the taker's run id."""
    if hand_over is not None and handover.mark_released(machine, paths):
        taker = hand_over(run_id, machine)
        if taker is not None:
            orch.let_go_of(run_id)  # the connection is the taker's from now on
            try:
                problem = handover.remove_run_dir(machine, paths)
                if problem:
                    orch.journal.add_event(run_id, "run_dir_left", {"error": problem})
                orch.reporter.note(f"the machine goes on to run {taker.run_id} (its setup "
                                   f"is done)")
            finally:
                taker.start(machine)  # never left journaled as the owner but not started
            return taker.run_id
    if hand_over is None and int(machine.info.get("seats") or 1) > 1:
        # a seat of a shared machine: other runs may train on it still, so this run's lingering
        # watch must not stop it (the last run's watch does)
        handover.mark_released(machine, paths)
    try:
        orch.provider.release(run_id, orch.journal)
    except FluxRemoteError as exc:
        out_dir = orch.run_row(run_id)["out_dir"]
        orch.set_state(run_id, R.FAILED,
                       error=f"the bundle is home in {out_dir} but destroying the machine "
                             f"failed: {exc}\n  retry: flux-remote down {run_id} --force",
                       ended_at=orch.clock())
        raise
    return None


def _publish_to_hub(orch: "Orchestrator", run_id: str, out_dir: Path) -> None:
    """Upload the verified bundle from this machine when ``publish.hf_repo`` is set.

    After the destroy on purpose: the instance bills nothing while the upload runs, and
    a failed upload loses nothing (the bundle is home; ``flux-remote publish`` retries).
    """
    spec = spec_of(orch.run_row(run_id))
    if not spec.publish.hf_repo:
        return
    from controller.hf_publish import publish_bundle

    orch.reporter.note(f"publishing to the Hugging Face Hub: {spec.publish.hf_repo}")
    try:
        url = publish_bundle(out_dir, spec.publish.hf_repo, private=spec.publish.hf_private,
                             token=orch.env.get("HF_TOKEN"))
    except FluxRemoteError as exc:
        orch.journal.add_event(run_id, "publish_failed", {"error": str(exc)})
        orch.reporter.note(f"publishing failed (the bundle is safe in {out_dir}): {exc}\n"
                           f"  retry: flux-remote publish {run_id}")
        return
    orch.journal.add_event(run_id, "published", {"url": url})
    orch.reporter.note(f"published: {url}")


def _safe_number(value: Any) -> float | None:
    """A number the agent reported, or None when it is not one (only a statistic here)."""
    try:
        return number(value, field="s_per_step", where="status.json")
    except UntrustedInput:
        return None


def _agent_error(host: Any, paths: RunPaths, status: dict[str, Any]) -> str:
    state = text_field(status.get("state"), limit=40)
    if state in ("failed", "done", "stopped"):
        error = text_field(status.get("error")) or f"the agent ended {state} without a bundle"
        cause = text_field(status.get("cause"), limit=80)
        return f"{error} (cause: {cause})" if cause else error
    rc = read_int(host, paths.rc)
    out = clean_text((host.read_bytes(paths.out, 0, 1 << 20) or b"")
                     .decode("utf-8", errors="replace"))
    tail = "\n".join(out.strip().splitlines()[-15:])
    return (f"the agent exited with code {rc} before finishing" if rc is not None else
            "the agent is gone without an exit code") + (f":\n{tail}" if tail else "")


def keep_for_later(orch: "Orchestrator", run: dict[str, Any], exc: Exception) -> "Outcome":
    run_id = run["run_id"]
    message = (f"the bundle could not be fetched and verified: {exc}\n"
               f"The instance was stopped, not destroyed, so the files are kept.\n"
               f"  fetch it later:  flux-remote fetch {run_id}\n"
               f"  then destroy it: flux-remote down {run_id}")
    machine = orch.held(run_id)
    if machine is not None:
        remove_secrets(machine.host, machine.root, run_id)  # also when the disk is kept
    try:
        orch.provider.release(run_id, orch.journal, keep_data=True)
    except FluxRemoteError as stop_exc:
        message += f"\n(stopping the instance failed too: {stop_exc})"
    orch.set_state(run_id, R.FAILED, error=message, ended_at=orch.clock())
    raise RunError(message)
