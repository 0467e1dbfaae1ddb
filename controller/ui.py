"""Rendering for people: the plan table, the live status panel, the final summary, run lists.

Everything takes data and a rich ``Console``; nothing here decides anything. Tests render to
``Console(file=io.StringIO(), width=100)``. On a terminal the status panel is a ``rich.live``
display with the log scrolling above it; elsewhere (a pipe, CI) a status line is printed whenever
the step or stage changes, so the output stays a readable log.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from controller.untrusted import clean_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    from controller.run.follow import Snapshot
    from controller.run.launch import MachineCheck
    from controller.run.orchestrator import Outcome
    from controller.providers.base import Estimate


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def plan_table(estimate: "Estimate", *, budget_usd: float, top: int = 5) -> Table:
    """The offers a launch would rent (Vast), or the own machine's price (ssh, local)."""
    offers = list(getattr(estimate.plan, "offers", None) or [])
    table = Table(title=f"plan ({estimate.provider}), budget {money(budget_usd)}",
                  title_justify="left")
    if not offers:
        table.add_column("provider")
        table.add_column("$/h", justify="right")
        table.add_column("est. hours", justify="right")
        table.add_column("est. cost", justify="right")
        table.add_row(estimate.provider, money(estimate.price_per_hour),
                      "-" if estimate.est_hours is None else f"{estimate.est_hours:.2f}",
                      money(estimate.est_usd))
        return table
    for name, justify in (("", "left"), ("offer", "right"), ("GPU", "left"), ("$/h", "right"),
                          ("est. hours", "right"), ("est. cost", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    chosen = getattr(estimate.plan, "chosen", None)
    for offer in offers[:top]:
        mark = "->" if chosen is not None and offer.offer_id == chosen.offer_id else ""
        table.add_row(mark, str(offer.offer_id), f"{offer.num_gpus}x {offer.gpu_name}",
                      f"${offer.dph_total:.3f}", f"{offer.est_hours:.2f}", money(offer.est_usd))
    return table


def checks_line(checks: "Sequence[MachineCheck]") -> Text:
    """The machine checks a launch passed, on one line: ``checks: python 3.11.7 · ssh ok · ...``
    (a failed check is red, a warning such as a missing WANDB_API_KEY yellow)."""
    line = Text("checks: ", style="dim")
    for i, check in enumerate(checks):
        if i:
            line.append(" · ", style="dim")
        style = "red" if not check.ok else "yellow" if check.short.startswith("not set") else ""
        line.append(f"{check.name} {check.short}", style=style)
    return line


def status_panel(snap: "Snapshot", *, title: str | None = None) -> Panel:
    """Stage, step/total, loss, s/step, ETA and spend vs budget of one poll."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    step = "-" if snap.step is None else f"{snap.step}/{snap.total or '?'}"
    # instance text: Text (markup shown literally), control sequences stripped
    grid.add_row("stage", Text(clean_text(f"{snap.stage or '-'} ({snap.agent_state or 'starting'})")))
    grid.add_row("step", step)
    grid.add_row("loss", "-" if snap.loss is None else f"{snap.loss:.4f}")
    grid.add_row("s/step", "-" if snap.s_per_step is None else f"{snap.s_per_step:.2f}")
    grid.add_row("ETA", duration(snap.eta_s))
    spend = f"{money(snap.spend_usd)} of {money(snap.budget_usd)}"
    if snap.price_per_hour:
        spend += f" (${snap.price_per_hour:.3f}/h, {duration(snap.elapsed_s)})"
    grid.add_row("spend", spend)
    if snap.stop_requested:
        grid.add_row("stop", "requested: the agent checkpoints and publishes")
    if snap.status.get("wandb_url"):
        grid.add_row("W&B", Text(clean_text(snap.status["wandb_url"], keep_newlines=False)))
    return Panel(grid, title=title or snap.run_id, title_align="left")


def status_line(snap: "Snapshot") -> str:
    step = "" if snap.step is None else f" step {snap.step}/{snap.total or '?'}"
    loss = "" if snap.loss is None else f" loss {snap.loss:.4f}"
    return (f"[{snap.stage or snap.agent_state or 'starting'}]{step}{loss} spend {money(snap.spend_usd)}"
            f"/{money(snap.budget_usd)}")


class LiveView:
    """The orchestrator's reporter for people: notes and log lines scroll, the panel stays."""

    def __init__(self, console: Console, *, show_logs: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.console = console
        self.show_logs = show_logs
        self.clock = clock
        self._live: Live | None = None
        self._last_line: str | None = None
        self._wandb_url: str | None = None

    def __enter__(self) -> "LiveView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def note(self, text: str) -> None:
        self.console.print(Text(f"- {clean_text(text)}", style="cyan"))

    def log(self, lines: list[str]) -> None:
        if self.show_logs:
            for line in lines:
                self.console.print(Text(clean_text(line), style="dim"), soft_wrap=True)

    def update(self, snap: "Snapshot") -> None:
        url = snap.status.get("wandb_url")
        if url and url != self._wandb_url:  # once, above the panel: easy to click or copy
            self._wandb_url = url
            self.note(f"Weights & Biases: {url}")
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(status_panel(snap), refresh=True)
            return
        line = status_line(snap)
        if line.split(" spend ")[0] != (self._last_line or "").split(" spend ")[0]:
            self.console.print(Text(clean_text(line)))
        self._last_line = line


def render_summary(console: Console, outcome: "Outcome") -> None:
    """What the user reads at the end: where the bundle is and what it cost."""
    if outcome.detached:
        console.print(f"[bold]{escape(outcome.run_id)}[/] runs on its own now.\n"
                      f"  follow it:  flux-remote resume {escape(outcome.run_id)}\n"
                      f"  stop it:    flux-remote stop {escape(outcome.run_id)}")
        return
    style = "green" if outcome.state == "done" else ("yellow" if outcome.ok else "red")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("state", Text(outcome.state, style=style))
    if outcome.bundle:
        grid.add_row("bundle", f"{outcome.bundle} (verified)")
    elif outcome.out_dir and outcome.extras:
        grid.add_row("logs", outcome.out_dir)
    receipt = outcome.receipt or {}
    grid.add_row("cost", f"{money(outcome.spend_usd)} metered, {money(outcome.est_usd)} "
                         f"estimated, budget {money(outcome.budget_usd)}")
    if receipt.get("idle_after_training_s") is not None:
        grid.add_row("idle", f"{duration(receipt['idle_after_training_s'])} between the last step "
                             f"and the destroy ({money(receipt.get('idle_after_training_usd'))})")
    if outcome.error:
        grid.add_row("error", Text(clean_text(outcome.error), style="red"))
    console.print(Panel(grid, title=outcome.run_id, title_align="left"))
    if outcome.bundle:  # on its own line, never wrapped: easy to copy
        console.print(Text(f"bundle: {outcome.bundle}"), soft_wrap=True)


def runs_table(runs: list[dict[str, Any]], *, now: float) -> Table:
    """``ls``: one row per run: state, machine, instance, spend of budget, age.

    The run id is never cut (people copy it into the next command); the table is borderless so
    that it fits 80 columns.
    """
    table = Table(title="runs", title_justify="left", box=None, padding=(0, 1),
                  header_style="bold")
    table.add_column("run", no_wrap=True)
    for name, justify, wrap in (("state", "left", False), ("machine", "left", True),
                                ("instance", "left", False), ("spend", "right", False),
                                ("age", "right", False)):
        table.add_column(name, justify=justify, no_wrap=not wrap,  # type: ignore[arg-type]
                         overflow="fold", min_width=len(name))
    for run in runs:
        machine = " ".join(part for part in (run["provider"], run.get("gpu_name")) if part)
        table.add_row(run["run_id"], run["state"], machine, run.get("instance_state") or "none",
                      f"{money(run.get('spend_usd'))}/{money(run.get('budget_usd'))}",
                      duration(now - run["created_at"]))
    return table


def run_detail(run: dict[str, Any], *, now: float) -> Panel:
    """``status RUN``: the journal's view of one run (refreshed by a live poll when possible)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    step = "-" if run.get("step") is None else f"{run['step']}/{run.get('total') or '?'}"
    rows = [("state", run["state"]), ("provider", run["provider"]),
            ("instance", run.get("instance_state") or "none"), ("stage", run.get("stage") or "-"),
            ("step", step), ("loss", "-" if run.get("loss") is None else f"{run['loss']:.4f}"),
            ("spend", f"{money(run.get('spend_usd'))} of {money(run.get('budget_usd'))}"),
            ("estimate", money(run.get("est_usd"))), ("age", duration(now - run["created_at"])),
            ("out", run.get("bundle_path") or run.get("out_dir") or "-")]
    for key, value in rows:
        grid.add_row(key, escape(str(value)))
    if run.get("error"):
        grid.add_row("error", Text(clean_text(run["error"]), style="red"))
    return Panel(grid, title=run["run_id"], title_align="left")


def cost_table(rows: list[dict[str, Any]]) -> Table:
    """``cost``: estimated vs metered spend per run, and the total."""
    table = Table(title="cost", title_justify="left")
    table.add_column("run", no_wrap=True)
    for name, justify in (("state", "left"), ("estimated", "right"),
                          ("metered", "right"), ("budget", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row["run_id"], row["state"], money(row.get("est_usd")),
                      money(row.get("spend_usd")), money(row.get("budget_usd")))
    table.add_section()
    table.add_row("total", "", money(sum(r.get("est_usd") or 0.0 for r in rows)),
                  money(sum(r.get("spend_usd") or 0.0 for r in rows)),
                  money(sum(r.get("budget_usd") or 0.0 for r in rows)))
    return table


def orphans_table(orphans: list[dict[str, Any]]) -> Table:
    table = Table(title="instances no live run owns", title_justify="left")
    for name in ("instance", "label", "status", "GPU", "$/h"):
        table.add_column(name)
    for orphan in orphans:
        table.add_row(str(orphan["instance_id"]), orphan.get("label") or "-",
                      str(orphan.get("status") or "-"), orphan.get("gpu_name") or "-",
                      "-" if orphan.get("dph_total") is None else f"{orphan['dph_total']:.3f}")
    return table


def render_group(console: Console, *items: Any) -> None:
    console.print(Group(*items))


# ---- batches (controller.batch.scheduler) -----------------------------------------------------------------

def batch_table(rows: list[dict[str, Any]], ledger: dict[str, Any], *, title: str,
                snaps: dict[str, Any] | None = None) -> Table:
    """A row per run of a batch (state, stage, step/total, loss, spend, ETA) and, in the caption,
    the batch's spend against its budget. ``snaps``: the newest live poll per run id, if any."""
    snaps = snaps or {}
    table = Table(title=title, title_justify="left",
                  caption=f"spent {money(ledger.get('spent_usd'))}, committed "
                          f"{money(ledger.get('committed_usd'))} of "
                          f"{money(ledger.get('total_usd'))}", caption_justify="left")
    table.add_column("run", overflow="fold", min_width=12)
    for name in ("state", "stage", "step", "loss", "spend", "ETA"):
        table.add_column(name, justify="left" if name in ("state", "stage") else "right",
                         no_wrap=True)
    for row in rows:
        snap = snaps.get(row.get("run_id") or "")
        step, total = (snap.step, snap.total) if snap is not None else (row.get("step"),
                                                                        row.get("total"))
        loss = snap.loss if snap is not None else row.get("loss")
        spend = snap.spend_usd if snap is not None else row.get("spend_usd")
        state = row["slot_state"] if row["slot_state"] != "active" else row["state"]
        if row["slot_state"] == "skipped":
            state = row.get("note") or "skipped: budget"
        table.add_row(row["name"], state, (snap.stage if snap is not None else row.get("stage"))
                      or "-", "-" if step is None else f"{step}/{total or '?'}",
                      "-" if loss is None else f"{loss:.4f}", money(spend),
                      duration(snap.eta_s) if snap is not None else "-")
    return table


def batch_line(row: dict[str, Any]) -> str:
    """One run of a batch as a log line (the non-terminal view prints it when it changes)."""
    step = "" if row.get("step") is None else f" step {row['step']}/{row.get('total') or '?'}"
    state = row.get("note") if row["slot_state"] == "skipped" else row["state"]
    return f"{row['name']}: {state} [{row.get('stage') or '-'}]{step}"


class BatchView:
    """The live view of a batch: a table on a terminal, changed lines elsewhere."""

    def __init__(self, console: Console, *, title: str) -> None:
        self.console = console
        self.title = title
        self._live: Live | None = None
        self._lines: dict[str, str] = {}

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, rows: list[dict[str, Any]], ledger: dict[str, Any],
             snaps: dict[str, Any] | None = None, notes: list[tuple[str, str]] = ()) -> None:
        for name, text in notes:
            self.console.print(Text(f"- {name}: {text}", style="cyan"), soft_wrap=True)
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(batch_table(rows, ledger, title=self.title, snaps=snaps),
                              refresh=True)
            return
        for row in rows:
            line = batch_line(row)
            if self._lines.get(row["name"]) != line:
                self._lines[row["name"]] = line
                self.console.print(Text(line), soft_wrap=True)


def batch_plan_table(rows: list[dict[str, Any]], *, total_usd: float, max_parallel: int) -> Table:
    """``launch batch.yaml``: each run's estimate and what it would reserve of the total."""
    table = Table(title=f"batch plan: {len(rows)} runs, {max_parallel} at once, total budget "
                        f"{money(total_usd)}", title_justify="left")
    table.add_column("run", overflow="fold", min_width=12)
    for name in ("GPU", "est. cost", "reserves", "note"):
        table.add_column(name, justify="right" if name in ("est. cost", "reserves") else "left")
    for row in rows:
        table.add_row(row["name"], row.get("gpu") or "-", money(row.get("est_usd")),
                      money(row.get("reserve_usd")), row.get("note") or "")
    return table


def batches_table(batches: list[dict[str, Any]]) -> Table:
    """``ls``: the batches, below the runs."""
    table = Table(title="batches", title_justify="left")
    table.add_column("batch", overflow="fold", min_width=12)
    for name in ("state", "runs", "spent", "budget"):
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    for batch in batches:
        table.add_row(batch["batch_id"], batch["state"], str(batch.get("runs", "-")),
                      money(batch.get("spent_usd")), money(batch.get("max_usd")))
    return table
