"""``flux-remote plan``: which offer would run this spec, for how many dollars. Nothing is rented.

A batch file gets its schedule instead (``controller.planning.schedule``): which run goes on
which machine, in what order, with the setup paid once per machine, against the batch budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors
from controller.errors import EXIT_BUDGET, SpecError

if TYPE_CHECKING:
    from controller.planning.planner import PlanResult
    from controller.planning.schedule import BatchSchedule
    from controller.providers.base import Estimate
    from controller.spec.loader import LoadedFile
    from controller.spec.model import RunSpec


def load_run_spec(path: Path) -> "RunSpec":
    """The validated spec, with located errors (``controller.spec.loader.load_spec``); the
    notebook loads its spec with it."""
    from controller.spec.loader import load_spec

    return load_spec(path)


def load_offers_file(path: Path) -> list[dict[str, Any]]:
    """Offers saved from a search: the API's ``{"offers": [...]}`` shape (a bare list works too)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read offers: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise SpecError(f"{path}: offers file is not JSON: {exc}") from exc
    offers = data.get("offers") if isinstance(data, dict) else data
    if not isinstance(offers, list) or not all(isinstance(o, dict) for o in offers):
        raise SpecError(f'{path}: expected {{"offers": [...]}} as saved from a Vast.ai search')
    return offers


def measured_speeds() -> dict[str, float]:
    """Seconds per step measured on the user's finished runs, by GPU model (from the journal)."""
    from controller.journal import journal_path, open_journal

    if not journal_path().exists():  # planning alone never creates the journal
        return {}
    journal = open_journal()
    try:
        return journal.measured_s_per_step()
    finally:
        journal.close()


def search_live(spec: "RunSpec") -> list[dict[str, Any]]:
    """Ask Vast.ai for the offers matching the spec (on-demand, plus bid when allowed)."""
    from controller.planning.planner import mark_interruptible, search_query
    from controller.vast.client import VastClient

    client = VastClient()
    offers = client.search_offers(search_query(spec))
    if spec.gpu.interruptible:
        offers += mark_interruptible(client.search_offers(search_query(spec, interruptible=True)))
    return offers


def read_account() -> dict[str, Any]:
    """The account's money as Vast reports it: ``credit`` and ``balance`` both, since which one
    is spendable is not documented (``VastClient.account_money``); nothing is refused on them.
    ``{"error": ...}`` when it cannot be read (the plan does not depend on it)."""
    from controller.errors import FluxRemoteError
    from controller.vast.client import VastClient

    try:
        return dict(VastClient().account_money())
    except FluxRemoteError as exc:
        return {"error": str(exc)}


def account_line(account: dict[str, Any]) -> str:
    if "error" in account:
        return f"account: could not read it ({account['error']})"
    shown = ", ".join(f"{name} ${value:.2f}" for name, value in account.items()
                      if value is not None)
    return (f"account: {shown or 'no credit or balance reported'} (Vast does not document "
            "which is spendable; both shown, nothing refused on them)")


WIDE_TABLE = 110  # narrower consoles get the "why" column as lines under the table


def _offers_table(result: "PlanResult", *, wide: bool, top: int) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="Offers by estimated cost of the whole run", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for name, justify in (("", "left"), ("offer", "right"), ("GPU", "left"), ("$/h", "right"),
                          ("est h", "right"), ("est $", "right"), ("Mb/s", "right"),
                          ("rel", "right"), ("loc", "left")):
        table.add_column(name, justify=justify,  # type: ignore[arg-type]
                         no_wrap=name not in ("GPU", "loc"))
    if wide:
        table.add_column("why", ratio=1)
    for est in result.offers[:top]:
        mark = "[bold green]>[/]" if est is result.chosen else ""
        if not est.fits:
            mark = "[red]x[/]"
        gpu = f"{est.num_gpus}x {est.gpu_name}" if est.num_gpus > 1 else est.gpu_name
        if est.interruptible:
            gpu += " (bid)"
        why = est.why if est.fits else f"over {est.refused}; {est.why}"
        location = str(est.offer.get("geolocation") or "?").rsplit(",", 1)[-1].strip()
        cells = [
            mark, str(est.offer_id), gpu, f"{est.dph_total:.3f}", f"{est.est_hours:.2f}",
            f"{est.est_usd:.2f}", f"{float(est.offer.get('inet_down') or 0):.0f}",
            f"{est.to_dict()['reliability']:.3f}", location,
        ]
        table.add_row(*cells, *([why] if wide else []))
    return table


def render_plan(result: "PlanResult", out: Any, *, top: int = 10) -> None:
    """The plan as a table on a rich Console ``out``: top offers, the chosen one marked."""
    wide = out.width >= WIDE_TABLE
    if result.offers:  # else nothing passed the filters: the exclusion counts below say why
        out.print(_offers_table(result, wide=wide, top=top))
    if not wide:
        for est in result.offers[:top]:
            why = est.why if est.fits else f"over {est.refused}; {est.why}"
            out.print(f"  {est.offer_id}: {why}")
    if result.excluded:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(result.excluded.items(),
                                                         key=lambda kv: -kv[1]))
        out.print(f"excluded ({result.considered} offers looked at): {parts}")
    chosen = result.chosen
    if chosen is not None:
        margin = chosen.est_usd * (1 + result.safety_margin)
        out.print(
            f"[bold]chosen:[/] offer {chosen.offer_id} ({chosen.gpu_name}), about "
            f"{chosen.est_hours:.2f} h, est ${chosen.est_usd:.2f} (${margin:.2f} with the "
            f"{result.safety_margin:.0%} margin) of the ${result.budget_usd:.2f} budget. "
            "Nothing was rented."
        )


def batch_schedule(loaded: "LoadedFile",
                   offers: list[dict[str, Any]] | None) -> "BatchSchedule":
    """The batch's schedule, each run estimated on ``offers`` (or a live search, one per
    distinct query), with the multi-GPU machines it may share
    (:func:`controller.planning.schedule.with_packs`)."""
    from controller.batch.setup import estimate_runs, offers_estimate
    from controller.planning.planner import search_query
    from controller.planning.schedule import schedule_batch, with_packs
    from controller.providers.base import own_machine_estimate

    batch = loaded.batch
    if batch is None:
        raise SpecError(f"{loaded.path} has no batch: section")
    measured = measured_speeds()
    searches: dict[str, list[dict[str, Any]]] = {}

    def estimate_one(spec: "RunSpec") -> "Estimate":
        if spec.provider.type != "vast":
            return own_machine_estimate(spec.provider.type, spec)
        found = offers
        if found is None:
            key = json.dumps([search_query(spec), spec.gpu.interruptible], sort_keys=True)
            if key not in searches:
                searches[key] = search_live(spec)
            found = searches[key]
        return offers_estimate(spec, found, measured)

    items = with_packs(estimate_runs(loaded, estimate_one), estimate_one,
                       gpus_per_machine=batch.gpus_per_machine, reuse=batch.reuse_machines)
    return schedule_batch(items, max_parallel=batch.max_parallel, budget_usd=batch.max_usd,
                          reuse=batch.reuse_machines, gpus_per_machine=batch.gpus_per_machine)


def _hours(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def render_schedule(schedule: "BatchSchedule", out: Any) -> None:
    """The schedule on a rich Console ``out``: machines with their runs in order (and the seat
    each run has on a multi-GPU machine, then what its idle seats cost), then the total against
    the budget and against one instance per run."""
    from rich import box
    from rich.table import Table

    table = Table(title="Batch schedule: machines and their runs in order", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for name, justify in (("machine", "left"), ("#", "right"), ("run", "left"),
                          ("start", "left"), ("from h", "right"), ("to h", "right"),
                          ("est $", "right"), ("reserve $", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    rows = {row.name: row for row in schedule.runs}
    for machine in schedule.machines:
        offer = "own hardware" if machine.offer_id is None else f"offer {machine.offer_id}"
        bid = " (bid)" if machine.interruptible else ""
        gpu = f"{machine.num_gpus}x {machine.gpu_name}" if machine.num_gpus > 1 \
            else str(machine.gpu_name)
        seats = f", {machine.seats} runs at once" if machine.packed else ""
        table.add_row(f"[bold]{machine.index + 1}[/]", "", f"[bold]{offer}, {gpu}{bid}, "
                      f"${machine.dph_total:.3f}/h{seats}[/]", "setup",
                      f"{machine.start_h:.2f}", "", f"{machine.setup_usd:.2f}", "",
                      end_section=False)
        for name in machine.runs:
            row = rows[name]
            where = f"{machine.index + 1} ({gpu}, seat {(row.seat or 0) + 1})" \
                if machine.packed else ""
            table.add_row(where, str(row.order), name, str(row.start), _hours(row.start_h),
                          _hours(row.end_h), f"{row.est_usd or 0.0:.2f}",
                          f"{row.reserved_usd or 0.0:.2f}",
                          end_section=name == machine.runs[-1] and not machine.packed)
        if machine.packed:
            table.add_row("", "", "idle seats", "", "", _hours(machine.end_h),
                          f"{machine.idle_usd:.2f}", "", end_section=True)
    if schedule.machines:
        out.print(table)
    for row in schedule.skipped:
        out.print(f"[red]skipped[/] {row.name}: {row.skipped}")
    setups = ", ".join(f"{m.setup_s / 60:.0f} min ${m.setup_usd:.2f}" for m in schedule.machines)
    out.print(f"setup paid once per machine ({len(schedule.machines)}): {setups or 'none'}")
    idle = f" (idle seats ${schedule.idle_usd:.2f} included)" \
        if any(m.packed for m in schedule.machines) else ""
    out.print(f"[bold]total:[/] est ${schedule.total_usd:.2f}{idle} of the "
              f"${schedule.budget_usd:.2f} batch budget; {schedule.wall_hours:.2f} h wall clock, "
              f"{schedule.machine_hours:.2f} machine-hours")
    per_run = schedule.per_run
    if per_run is not None:
        saved = per_run.setups - schedule.setups
        out.print(f"one instance per run: est ${per_run.total_usd:.2f}, {per_run.setups} setups, "
                  f"{per_run.wall_hours:.2f} h wall clock, {per_run.machine_hours:.2f} "
                  f"machine-hours; this schedule saves ${schedule.saving_usd or 0.0:.2f} and "
                  f"{saved} setup{'' if saved == 1 else 's'}. Nothing was rented.")


def plan_batch_file(loaded: "LoadedFile", offers: list[dict[str, Any]] | None,
                    as_json: bool) -> None:
    """``plan BATCH.yaml``: print the schedule; exit with the budget code when it does not fit."""
    from controller.errors import BudgetError

    schedule = batch_schedule(loaded, offers)
    if as_json:
        data = schedule.to_dict()
        if not schedule.fits:
            emit_json({"ok": False, "error": "BudgetError", "message": schedule.refusal(),
                       **data})
            raise typer.Exit(EXIT_BUDGET)
        emit_json({"ok": True, **data})
        return
    render_schedule(schedule, console())
    if not schedule.fits:
        raise BudgetError(schedule.refusal(),
                          hint="raise batch.max_usd, drop runs, or relax the gpu filters")


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @handles_errors
    def plan(
        file: Path = typer.Argument(..., help="The run spec (run.yaml) or a batch file."),
        offers: Optional[Path] = typer.Option(
            None, "--offers", help='Plan against a saved search result ({"offers": [...]}) '
            "instead of asking Vast.ai."),
        top: int = typer.Option(10, "--top", min=1, help="How many offers to show."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Show which offer would train this spec most cheaply, and the estimate vs the budget.
        For a batch file: which run goes on which machine, in what order, against the batch budget.

        Example: flux-remote plan run.yaml --top 5
        """
        from controller.planning.planner import plan_offers
        from controller.spec.loader import load_file

        loaded = load_file(file)
        if loaded.batch is not None:
            plan_batch_file(loaded, load_offers_file(offers) if offers is not None else None,
                            as_json)
            return
        spec = loaded.runs[0]
        found = load_offers_file(offers) if offers is not None else search_live(spec)
        result = plan_offers(spec, found, measured_s_per_step=measured_speeds())
        account = read_account() if offers is None else None
        if as_json:
            data = result.to_dict()
            if account is not None:
                data["account"] = account
            data["offers"] = data["offers"][:top]
            if result.chosen is None:
                emit_json({"ok": False, "error": "BudgetError", "message": result.refusal(),
                           **data})
                raise typer.Exit(EXIT_BUDGET)
            emit_json({"ok": True, **data})
            return
        render_plan(result, console(), top=top)
        if account is not None:
            console().print(account_line(account), markup=False)
        result.require_chosen()
