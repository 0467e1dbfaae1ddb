"""``flux-remote check-dataset``: the agent's ingest + captions + quality gate, run on the laptop
so a dataset can be fixed before anything is rented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from controller.cli.common import JSON_OPTION, console, emit_json, handles_errors
from controller.errors import EXIT_OK, EXIT_RUN_FAILED

MAX_ROWS = 40  # flagged images shown in the table; --json has them all


def register(app: typer.Typer) -> None:
    app.command("check-dataset")(check_dataset_cmd)


@handles_errors
def check_dataset_cmd(
    target: Path = typer.Argument(..., help="A run spec (run.yaml) or a dataset folder."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Check a dataset: ingest, template captions and the quality gate, on this machine.

    With a run spec, its thresholds, trigger word and caption settings apply.

    With a folder, the defaults apply. A batch checks each distinct dataset once.

    Exit 0 when the gate passes, 1 when it fails, 2 for bad input.

    Example: flux-remote check-dataset run.yaml
    """
    from controller.dataset_check import run_checks

    checks = run_checks(target)
    passed = all(report["passed"] for _, report in checks)
    if as_json:
        if len(checks) == 1:
            emit_json({"source": checks[0][0], **checks[0][1]})
        else:
            emit_json({"passed": passed, "checks": [{"source": label, **report}
                                                    for label, report in checks]})
    else:
        out = console()
        for label, report in checks:
            render_report(report, out, label=label)
    raise typer.Exit(EXIT_OK if passed else EXIT_RUN_FAILED)


def render_report(report: dict[str, Any], out: Any, *, label: str | None = None) -> None:
    """Draw one check's report on a rich Console: categories, flagged images, the verdict."""
    from rich.table import Table
    from rich.text import Text

    gate = report["gate"]
    exclude = set(gate["settings"]["exclude"]) if gate["settings"]["enabled"] else {"corrupt"}
    out.print(Text(f"dataset check: {label or report['dataset']}", style="bold"))
    totals = Table(show_edge=False)
    totals.add_column("category")
    totals.add_column("images", justify="right")
    totals.add_column("action")
    for category, count in gate["totals"].items():
        action = "excluded" if category in exclude else "warning"
        totals.add_row(category, str(count), action if count else "")
    out.print(totals)

    flagged = [img for img in gate["images"] if img["categories"]]
    if flagged:
        table = Table(show_edge=False)
        table.add_column("image", overflow="fold")
        table.add_column("", no_wrap=True)
        table.add_column("why", overflow="fold")
        for img in flagged[:MAX_ROWS]:
            why = "; ".join(f"{cat}: {text}" for cat, text in img["details"].items())
            table.add_row(Text(img["source"]), "excluded" if img["excluded"] else "warning",
                          Text(why))
        out.print(table)
        if len(flagged) > MAX_ROWS:
            out.print(f"... and {len(flagged) - MAX_ROWS} more (use --json for all)")

    caps = report["captions"]
    stats = caps["length_words"]
    line = (f"captions: {caps['kept']} kept, {caps['trigger_inserted']} trigger added, "
            f"{caps['templated']} from template, {caps['missing']} missing")
    if stats["count"]:
        line += f" (words: min {stats['min']}, median {stats['median']}, max {stats['max']})"
    out.print(line, markup=False)
    for warning in gate["warnings"]:
        out.print(f"warning: {warning}", markup=False, style="yellow")
    verdict = "[bold green]PASSED[/]" if gate["passed"] else "[bold red]FAILED[/]"
    out.print(f"{verdict}: {gate['usable_count']} usable of {gate['image_count']} images, "
              f"{gate['excluded_count']} excluded")
    for reason in gate["reasons"]:
        out.print(f"  {reason}", markup=False)
