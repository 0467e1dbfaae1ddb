"""``flux-remote plan``: which offer would run this spec, for how many dollars. Nothing is rented."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors
from controller.errors import EXIT_BUDGET, SpecError

if TYPE_CHECKING:
    from controller.planning.planner import PlanResult
    from controller.spec.model import RunSpec


def load_run_spec(path: Path) -> "RunSpec":
    """The validated spec, with located errors (``controller.spec.loader.load_spec``)."""
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


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @handles_errors
    def plan(
        file: Path = typer.Argument(..., help="The run spec (run.yaml)."),
        offers: Optional[Path] = typer.Option(
            None, "--offers", help='Plan against a saved search result ({"offers": [...]}) '
            "instead of asking Vast.ai."),
        top: int = typer.Option(10, "--top", min=1, help="How many offers to show."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Show which offer would train this spec most cheaply, and the estimate vs the budget.

        Example: flux-remote plan run.yaml --top 5
        """
        from controller.planning.planner import plan_offers

        spec = load_run_spec(file)
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
