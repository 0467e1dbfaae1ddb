"""The run commands: ``launch``, ``status``, ``ls``, ``logs``, ``stop``, ``down``, ``fetch``,
``resume``, ``gc``, ``cost``. Parsing and rendering only; the lifecycle is
``controller.run.orchestrator``.

Ctrl-C while following asks whether to stop the run (graceful: checkpoint, publish, fetch,
destroy) or to detach (the run carries on; ``flux-remote resume RUN`` reattaches). With ``--yes``
nothing is asked and Ctrl-C detaches: an unattended script never stops a paid run by accident,
and the agent's own cost guard and watchdog still bound its spend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors
from controller.errors import EXIT_BUDGET, EXIT_RUN_FAILED, RunError, SpecError

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.run.orchestrator import Options, Orchestrator, Outcome

POLL_OPTION = typer.Option(2.0, "--poll-interval", hidden=True, min=0.01,
                           help="Seconds between polls of the agent.")
VERBOSE_OPTION = typer.Option(False, "--verbose", "-v", help="Also show the agent's and the "
                              "trainer's raw lines (always in `flux-remote logs RUN`).")


def _journal() -> "Journal":
    from controller.journal import open_journal

    return open_journal()


QUICK_SSH_READY_S = 20.0  # status / logs: an instance that does not answer soon is reported


def _orchestrator(journal: "Journal", provider_name: str, reporter: Any = None, *,
                  quick: bool = False) -> "Orchestrator":
    from controller.run.orchestrator import Orchestrator
    from controller.providers import provider_named

    extra: dict[str, Any] = {}
    if quick and provider_name == "vast":
        extra["ssh_ready_s"] = QUICK_SSH_READY_S
    provider = provider_named(provider_name, journal=journal, **extra)
    return Orchestrator(journal, provider, reporter=reporter)


def _find_run(journal: "Journal", ref: str | None) -> dict[str, Any]:
    """A run by id or unique id prefix; the newest run when ``ref`` is None."""
    if ref is None:
        runs = journal.list_runs()
        if not runs:
            raise SpecError("no runs yet", hint="start one with `flux-remote launch run.yaml`")
        return runs[-1]
    found = journal.find_runs(ref)
    if not found:
        raise SpecError(f"no run {ref!r}", hint="see `flux-remote ls`")
    if len(found) > 1:
        names = ", ".join(r["run_id"] for r in found[:5])
        raise SpecError(f"{ref!r} matches {len(found)} runs ({names}); give more of the id")
    return found[0]


def _with_instance(journal: "Journal", run: dict[str, Any]) -> dict[str, Any]:
    rows = journal.instances(run["run_id"])
    last = rows[-1] if rows else {}
    state = last.get("state") if last else None
    return {**run, "instance_state": {"creating": "renting", "failed": "none",
                                      "destroying": "live"}.get(state or "", state) or "none",
              "instance_id": last.get("instance_id"), "gpu_name": last.get("gpu_name")}


def _view(as_json: bool, *, show_logs: bool = False) -> Any:
    from controller.run.follow import NullReporter
    from controller.ui import LiveView

    return NullReporter() if as_json else LiveView(console(), show_logs=show_logs)


def _close(view: Any) -> None:
    close = getattr(view, "close", None)
    if close is not None:
        close()


def _ask_stop() -> bool:
    choice = typer.prompt("\nstop the run (s) or detach and let it run (d)?", default="d")
    return choice.strip().lower().startswith("s")


def _drive_interactive(orch: "Orchestrator", run_id: str, options: "Options", *,
                       yes: bool, estimate: Any = None) -> "Outcome":
    """Drive the run; on Ctrl-C ask stop-or-detach (``--yes``: detach); see
    ``controller.run.launch.drive_interactive``."""
    from controller.run.launch import drive_interactive

    return drive_interactive(orch, run_id, options, estimate=estimate,
                             ask_stop=None if yes else _ask_stop)


def _finish(outcome: "Outcome", as_json: bool, *, extra: Optional[dict[str, Any]] = None) -> None:
    from controller.run import states as R
    from controller.ui import render_summary

    if as_json:
        emit_json({**outcome.to_dict(), **(extra or {})})
    else:
        render_summary(console(), outcome)
    if outcome.state == R.BUDGET and not outcome.detached:
        raise typer.Exit(EXIT_BUDGET)  # README: 3 refused or ended by the budget
    if not outcome.ok:
        raise typer.Exit(EXIT_RUN_FAILED)


@handles_errors
def launch(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The run spec (YAML)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before renting."),
    detach: bool = typer.Option(False, "--detach", help="Return once the agent has started."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where the bundle goes "
                                       "(default: publish.out_dir, else ./runs/<name>/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only; rent nothing."),
    poll_interval: float = POLL_OPTION,
    verbose: bool = VERBOSE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Plan, rent, ship, train, fetch, verify, destroy.

    Example: flux-remote launch configs/demo-local.yaml --yes
    """
    from controller.run.orchestrator import Options
    from controller.ui import checks_line, plan_table

    if as_json and not (yes or dry_run):
        raise SpecError("--json needs --yes or --dry-run (there is no prompt on a JSON stream)")
    from controller.spec.loader import load_file

    loaded = load_file(file)
    if loaded.batch is not None:
        _launch_batch(loaded, file, yes=yes, detach=detach, out=out, dry_run=dry_run,
                      poll_interval=poll_interval, as_json=as_json)
        return
    from controller.run.launch import plan_run, preflight

    spec = loaded.runs[0]
    checks = preflight(spec)
    if spec.provider.type == "local":
        checks = []  # not enforced for local (its agent says the same at no cost): not shown
    if checks and not as_json:
        console().print(checks_line(checks))
    journal = _journal()
    view = _view(as_json, show_logs=verbose)
    orch, estimate = plan_run(spec, journal, reporter=view)
    if not as_json:
        console().print(plan_table(estimate, budget_usd=spec.budget.max_usd))
    if dry_run:
        if as_json:
            emit_json({"ok": True, "dry_run": True, **estimate.to_dict(),
                       "checks": [check.to_dict() for check in checks]})
        return
    if not yes and not typer.confirm("start this run?", default=True):
        console().print("nothing rented.")
        return
    run_id = orch.create_run(spec, estimate, out_dir=out, spec_path=file.resolve())
    if not as_json:
        console().print(f"run [bold]{run_id}[/]")
    options = Options(detach=detach, poll_interval=poll_interval)
    try:
        outcome = _drive_interactive(orch, run_id, options, yes=yes, estimate=estimate)
    finally:
        _close(view)
    _finish(outcome, as_json, extra={"checks": [check.to_dict() for check in checks]})


def _launch_batch(loaded: Any, file: Path, *, yes: bool, detach: bool, out: Optional[Path],
                  dry_run: bool, poll_interval: float, as_json: bool) -> None:
    """``launch`` of a batch file: the plan of every run, then the scheduler (controller.batch.scheduler)."""
    from controller.batch.setup import create_batch, plan_batch
    from controller.providers import provider_named
    from controller.ui import batch_plan_table

    if detach:
        raise SpecError("--detach does not apply to a batch: this process schedules its runs "
                        "(Ctrl-C leaves the started runs going; `flux-remote resume BATCH` "
                        "carries on)")
    from controller.run.launch import preflight

    passed: set[str] = set()
    for spec in loaded.runs:
        preflight(spec, passed=passed)
    journal = _journal()
    rows = plan_batch(loaded, lambda name: provider_named(name, journal=journal))
    batch = loaded.batch
    if as_json and dry_run:
        emit_json({"ok": True, "dry_run": True, "max_usd": batch.max_usd,
                   "max_parallel": batch.max_parallel, "runs": rows})
        return
    if not as_json:
        console().print(batch_plan_table(rows, total_usd=batch.max_usd,
                                         max_parallel=batch.max_parallel))
    if dry_run or (not yes and not typer.confirm("start this batch?", default=True)):
        if not dry_run:
            console().print("nothing rented.")
        return
    batch_id = create_batch(journal, loaded, out_dir=out, spec_path=file.resolve())
    if not as_json:
        console().print(f"batch [bold]{batch_id}[/]")
    _run_batch(journal, batch_id, poll_interval=poll_interval, as_json=as_json)


def _run_batch(journal: "Journal", batch_id: str, *, poll_interval: float,
               as_json: bool) -> None:
    """Schedule the batch's runs to their end (or carry on after a crash), then summarise."""
    from controller.batch.scheduler import BatchOptions, BatchScheduler
    from controller.batch.setup import batch_rows
    from controller.ui import BatchView, batch_table

    view = None if as_json else BatchView(console(), title=f"batch {batch_id}")

    def tick(sched: Any) -> None:
        if view is not None:
            view.show(batch_rows(sched.journal, batch_id), sched.ledger.to_dict(),
                      sched.board.snaps, sched.board.take_notes())

    scheduler = BatchScheduler(journal, batch_id, on_tick=tick,
                               options=BatchOptions(poll_interval=poll_interval))
    try:
        result = scheduler.run()
    except KeyboardInterrupt:
        if view is not None:
            view.close()
        console(stderr=True).print(f"detached: started runs keep going on their machines; "
                                   f"carry on with `flux-remote resume {batch_id}`")
        raise typer.Exit(130) from None
    finally:
        if view is not None:
            view.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        console().print(batch_table(result.rows, result.ledger, title=f"batch {batch_id}: "
                                                                      f"{result.state}"))
        console().print(f"summary: {result.summary_path}\nreport:  {result.report_path}",
                        soft_wrap=True)
    if not result.ok:
        raise typer.Exit(EXIT_RUN_FAILED)


def _batch_of(journal: "Journal", ref: Optional[str]) -> Optional[dict[str, Any]]:
    from controller.batch.setup import find_batch

    return find_batch(journal, ref)


@handles_errors
def resume(
    run: str = typer.Argument(..., help="Run or batch id (or a unique prefix)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Ctrl-C detaches without asking."),
    detach: bool = typer.Option(False, "--detach", help="Return once the agent runs."),
    poll_interval: float = POLL_OPTION,
    verbose: bool = VERBOSE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Reattach to a run after the controller or the laptop died, and carry it to its end.

    Example: flux-remote resume demo-local-20261129-184000-3fa2
    """
    from controller.run.orchestrator import Options

    journal = _journal()
    batch = _batch_of(journal, run)
    if batch is not None:
        _run_batch(journal, batch["batch_id"], poll_interval=poll_interval, as_json=as_json)
        return
    row = _find_run(journal, run)
    view = _view(as_json, show_logs=verbose)
    orch = _orchestrator(journal, row["provider"], view)
    try:
        outcome = _drive_interactive(orch, row["run_id"],
                                     Options(detach=detach, poll_interval=poll_interval),
                                     yes=yes or as_json)
    finally:
        _close(view)
    _finish(outcome, as_json)


def _stop_batch(journal: "Journal", batch_id: str, *, poll_interval: float,
                as_json: bool) -> None:
    """``stop BATCH``: start nothing more, ask every running run to finish, then carry the
    batch to its end here (or leave that to the controller already running it)."""
    from controller.run import states as R
    from controller.batch.stop import active_runs, cancel_pending
    from controller.run.states import RunLockedError

    cancel_pending(journal, batch_id, "stopped by the user before it started")
    for row in active_runs(journal, batch_id):
        orch = _orchestrator(journal, row["provider"])
        if row["state"] == R.RUNNING:
            orch.request_stop(row["run_id"])
        elif row["state"] != R.FETCHING:
            try:
                orch.down(row["run_id"], force=True)  # no agent yet: nothing to save
            except RunLockedError:  # the controller running the batch holds it: that one
                # writes its STOP once its agent runs (``BatchScheduler._deferred_stops``)
                journal.add_event(row["run_id"], "stop_deferred",
                                  {"reason": "stop requested by the user"})
    try:
        _run_batch(journal, batch_id, poll_interval=poll_interval, as_json=as_json)
    except RunLockedError:
        console(stderr=True).print(f"{batch_id}: STOP written to its runs; the controller "
                                   "running the batch fetches the bundles and destroys")


@handles_errors
def stop(
    run: str = typer.Argument(..., help="Run or batch id (or a unique prefix)."),
    poll_interval: float = POLL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop gracefully: the agent checkpoints and publishes; then fetch, verify, destroy.

    Example: flux-remote stop demo-local-20261129-184000-3fa2
    """
    from controller.run import states as R
    from controller.run.orchestrator import Options
    from controller.run.states import RunLockedError

    journal = _journal()
    batch = _batch_of(journal, run)
    if batch is not None:
        _stop_batch(journal, batch["batch_id"], poll_interval=poll_interval, as_json=as_json)
        return
    row = _find_run(journal, run)
    view = _view(as_json)
    orch = _orchestrator(journal, row["provider"], view)
    try:
        if row["state"] == R.RUNNING:
            orch.request_stop(row["run_id"])
            try:
                outcome = orch.drive(row["run_id"], Options(poll_interval=poll_interval))
            except RunLockedError:
                console(stderr=True).print(f"{row['run_id']}: STOP written; the controller "
                                           "following it fetches the bundle and destroys")
                return
        elif row["state"] in R.ACTIVE_STATES and row["state"] != R.FETCHING:
            outcome = orch.down(row["run_id"], force=True)  # no agent yet: nothing to save
        else:
            outcome = orch.drive(row["run_id"], Options(poll_interval=poll_interval))
    finally:
        _close(view)
    _finish(outcome, as_json)


@handles_errors
def down(
    run: str = typer.Argument(..., help="Run or batch id (or a unique prefix)."),
    force: bool = typer.Option(False, "--force", help="Destroy without fetching anything first."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Destroy the run's instance now (after fetching what can be fetched, unless --force).

    Example: flux-remote down demo-local-20261129-184000-3fa2
    """
    journal = _journal()
    batch = _batch_of(journal, run)
    if batch is not None:
        from controller.run import states as R
        from controller.batch.stop import cancel_pending
        from controller.batch.report import write_report

        cancel_pending(journal, batch["batch_id"], "taken down by the user before it started")
        outcomes = [_orchestrator(journal, r["provider"]).down(r["run_id"], force=force)
                    for r in journal.runs_of_batch(batch["batch_id"])
                    if journal.current_instance(r["run_id"]) is not None
                    or r["state"] in R.ACTIVE_STATES]
        journal.update_batch(batch["batch_id"], state="stopped", ended_at=time.time())
        write_report(journal, batch["batch_id"])
        if as_json:
            emit_json({"ok": True, "batch_id": batch["batch_id"],
                       "runs": [o.to_dict() for o in outcomes]})
        else:
            console().print(f"{batch['batch_id']}: {len(outcomes)} machines released")
        return
    row = _find_run(journal, run)
    orch = _orchestrator(journal, row["provider"], _view(as_json))
    outcome = orch.down(row["run_id"], force=force)
    if as_json:
        emit_json(outcome.to_dict())
    else:
        console().print(f"{outcome.run_id}: machine released; run {outcome.state}"
                        + (f"; files in {outcome.bundle}" if outcome.bundle else ""))


@handles_errors
def fetch(
    run: str = typer.Argument(..., help="Run id (or a unique prefix)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Download the verified bundle (or, without one, the newest checkpoint and the logs).

    Example: flux-remote fetch demo-local-20261129-184000-3fa2
    """
    journal = _journal()
    row = _find_run(journal, run)
    orch = _orchestrator(journal, row["provider"], _view(as_json))
    result = orch.fetch_now(row["run_id"])
    if as_json:
        emit_json({"ok": True, "run_id": row["run_id"], **result})
    elif result["bundle"]:
        console().print(f"bundle verified ({result['files_verified']} files): {result['bundle']}")
    else:
        console().print(f"no bundle yet; fetched {len(result['extras'])} files into "
                        f"{row['out_dir']}")


@handles_errors
def status(
    run: Optional[str] = typer.Argument(None, help="Run or batch id or prefix "
                                                   "(default: the newest run)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """One run's state, stage, step, loss and spend (polled live when it is running).

    Example: flux-remote status demo-local
    """
    from controller.run import states as R
    from controller.errors import FluxRemoteError
    from controller.run.orchestrator import Options
    from controller.ui import run_detail

    journal = _journal()
    batch = _batch_of(journal, run)
    if batch is not None:
        from controller.batch.scheduler import batch_result
        from controller.ui import batch_table

        result = batch_result(journal, batch["batch_id"])
        if as_json:
            emit_json({"ok": True, "batch": result.to_dict()})
        else:
            console().print(batch_table(result.rows, result.ledger,
                                        title=f"batch {batch['batch_id']}: {result.state}"))
        return
    row = _find_run(journal, run)
    note = None
    if row["state"] == R.RUNNING:
        try:
            orch = _orchestrator(journal, row["provider"], quick=True)
            orch.follower(row, Options()).poll()
        except FluxRemoteError as exc:
            note = f"could not reach the run's machine: {exc}"
    row = _with_instance(journal, journal.get_run(row["run_id"]) or row)
    if as_json:
        emit_json({"ok": True, "run": _public(row), "note": note})
        return
    console().print(run_detail(row, now=time.time()))
    if note:
        from rich.text import Text

        from controller.untrusted import clean_text

        console().print(Text(clean_text(note), style="yellow"))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "spec_json"}


@handles_errors
def ls(as_json: bool = JSON_OPTION) -> None:
    """Every run in the journal with its state, GPU, spend and age.

    Example: flux-remote ls
    """
    from controller.ui import runs_table

    from controller.ui import batches_table

    journal = _journal()
    rows = [_with_instance(journal, r) for r in journal.list_runs()]
    batches = [{**b, "runs": len(journal.batch_runs(b["batch_id"])),
                "spent_usd": sum(r["spend_usd"] or 0.0
                                 for r in journal.runs_of_batch(b["batch_id"]))}
               for b in journal.list_batches()]
    if as_json:
        emit_json({"ok": True, "runs": [_public(r) for r in rows], "batches": batches})
    else:
        console().print(runs_table(rows, now=time.time()))
        if batches:
            console().print(batches_table(batches))


@handles_errors
def logs(
    run: str = typer.Argument(..., help="Run id (or a unique prefix)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    tail: Optional[int] = typer.Option(None, "--tail", "-n", min=0, help="Only the last N lines."),
    poll_interval: float = POLL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The agent's log, from its machine while it exists, else from the fetched copy.

    Example: flux-remote logs demo-local --tail 50
    """
    from controller.errors import FluxRemoteError
    from controller.run.follow import RunPaths, log_lines, read_int

    journal = _journal()
    row = _find_run(journal, run)
    host = paths = None
    if journal.current_instance(row["run_id"]) is not None and row["remote_run_dir"]:
        try:
            orch = _orchestrator(journal, row["provider"], quick=True)
            host, paths = orch.machine(row["run_id"]).host, RunPaths(row["remote_run_dir"])
        except FluxRemoteError:
            host = None
    if host is not None and paths is not None:
        data = host.read_bytes(paths.log) or b""
    else:
        local = Path(row["out_dir"]) / "logs" / "agent.log"
        if not local.exists():
            raise RunError(f"no log for {row['run_id']}: its machine is gone and nothing was "
                           "fetched")
        data = local.read_bytes()
    offset = data.rfind(b"\n") + 1  # whole lines only; a half line is shown once it ends
    lines = log_lines(data[:offset])
    shown = [] if tail == 0 else lines[-tail:] if tail is not None else lines
    if as_json:
        emit_json({"ok": True, "run_id": row["run_id"], "lines": shown})
        return
    for line in shown:
        typer.echo(line)
    if not follow or host is None or paths is None:
        return
    while True:
        chunk = host.read_bytes(paths.log, offset) or b""
        cut = chunk.rfind(b"\n") + 1
        for line in log_lines(chunk[:cut]):
            typer.echo(line)
        offset += cut
        if not cut and read_int(host, paths.rc) is not None:
            return
        time.sleep(poll_interval)


@handles_errors
def gc(
    yes: bool = typer.Option(False, "--yes", "-y", help="Destroy without asking."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Find instances labelled flux-remote: that no live run owns, and destroy them.

    Example: flux-remote gc
    """
    from controller.providers import provider_named
    from controller.run.reconcile import destroy_orphans, find_orphans
    from controller.ui import orphans_table

    journal = _journal()
    factory = lambda name: provider_named(name, journal=journal)  # noqa: E731
    orphans = find_orphans(journal, factory)
    if not orphans:
        if as_json:
            emit_json({"ok": True, "orphans": [], "destroyed": []})
        else:
            console().print("no orphaned instances.")
        return
    if not as_json:
        console().print(orphans_table(orphans))
    if not yes:
        if as_json:
            emit_json({"ok": True, "orphans": orphans, "destroyed": []})
            return
        if not typer.confirm(f"destroy these {len(orphans)} instances?", default=False):
            console().print("nothing destroyed.")
            return
    destroyed = destroy_orphans(journal, factory, orphans)
    if as_json:
        emit_json({"ok": True, "orphans": orphans, "destroyed": destroyed})
    else:
        console().print(f"destroyed {len(destroyed)} instances.")


@handles_errors
def cost(
    run: Optional[str] = typer.Argument(None, help="One run or batch (default: all)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Estimated vs metered spend per run, and the total.

    Example: flux-remote cost
    """
    from controller.ui import cost_table

    journal = _journal()
    batch = _batch_of(journal, run)
    if batch is not None:
        rows = journal.runs_of_batch(batch["batch_id"])
    else:
        rows = [_find_run(journal, run)] if run else journal.list_runs()
    data = [{"run_id": r["run_id"], "state": r["state"], "est_usd": r["est_usd"],
             "spend_usd": r["spend_usd"], "budget_usd": r["budget_usd"]} for r in rows]
    idle = 0.0
    if batch is not None:  # the idle GPUs of its multi-GPU instances: billed, but to no run
        from controller.batch.seats import batch_idle_usd

        idle = batch_idle_usd(journal, rows, journal.clock())
    if as_json:
        emit_json({"ok": True, "runs": data, "idle_usd": idle,
                   "total_spend_usd": sum(r["spend_usd"] or 0.0 for r in data) + idle,
                   "total_est_usd": sum(r["est_usd"] or 0.0 for r in data)})
    else:
        idle_row = [{"run_id": "(idle GPUs)", "state": "-", "est_usd": None,
                     "spend_usd": idle, "budget_usd": None}] if idle else []
        console().print(cost_table(data + idle_row))


def register(app: typer.Typer) -> None:
    for command in (launch, status, ls, logs, stop, down, fetch, resume, gc, cost):
        app.command(name=command.__name__)(command)
