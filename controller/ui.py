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
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from controller.run.checklist import checked, label, plain, stage_rows
from controller.untrusted import clean_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    from controller.run.checklist import StageRow
    from controller.run.follow import Snapshot
    from controller.run.launch import MachineCheck
    from controller.run.orchestrator import Outcome
    from controller.providers.base import Estimate


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def loss_text(value: Any) -> str:
    """A loss to 4 decimals; "-" for none (or for anything that is not a number)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else "-"


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


PANEL_WIDTH = 100  # wider is no calmer: the panel keeps this width on a wide terminal
MAX_LOSSES = 10_000  # loss values kept for the sparkline (one per poll that saw a new step)
SPARK = "▁▂▃▄▅▆▇█"
MARKS = {"done": ("✓", "green"), "running": ("▸", "bold cyan"), "failed": ("✗", "bold red"),
         "stopped": ("■", "yellow"), "skipped": ("–", "dim"), "pending": ("·", "dim")}


def sparkline(values: "Sequence[float]", width: int = 24) -> str:
    """The values as at most ``width`` block characters, lowest to highest (flat: all low);
    more values than that are averaged in equal runs, so the whole curve stays in view."""
    points = [v for v in values if v == v]  # NaN has no height
    if len(points) > width:
        edges = [round(i * len(points) / width) for i in range(width + 1)]
        points = [sum(points[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    if not points:
        return ""
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in points)


def bar(completed: float, total: float, *, width: int = 24) -> ProgressBar:
    return ProgressBar(total=max(total, 1e-9), completed=max(0.0, min(completed, total)),
                       width=width)


def _current(snap: "Snapshot", running_for: float | None) -> Table:
    """The running stage's cell: a step bar in training, else how long it has been running."""
    cell = Table.grid(padding=(0, 1))
    if snap.stage == "train" and snap.step is not None and snap.total:
        cell.add_row(bar(snap.step, snap.total), Text(f"{snap.step}/{snap.total}"),
                     Text(f"{100 * snap.step / snap.total:.0f}%", style="dim"))
    else:
        cell.add_row(Text(f"running {duration(running_for)}" if running_for is not None
                          else "running", style="cyan"))
    return cell


def checklist(rows: "Sequence[StageRow]", snap: "Snapshot", *,
              running_for: float | None = None) -> Table:
    """The stages, one line each: a mark, the name, its time and its one fact (the running
    stage: its progress instead)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=1, no_wrap=True)
    grid.add_column(min_width=12, no_wrap=True)
    grid.add_column(justify="right", min_width=5, no_wrap=True)
    grid.add_column(overflow="ellipsis", no_wrap=True, ratio=1)  # long facts are cut, not wrapped
    for row in rows:
        mark, style = MARKS.get(row.state, MARKS["pending"])
        name_style = "dim" if row.state in ("pending", "skipped") else ""
        fact: Any = Text(row.fact, style="red" if row.state == "failed" else "",
                         overflow="ellipsis", no_wrap=True)
        if row.state == "running":
            fact = _current(snap, running_for)
        grid.add_row(Text(mark, style=style), Text(row.label, style=name_style),
                     Text(duration(row.seconds) if row.seconds is not None else "", style="dim"),
                     fact)
    return grid


def status_panel(snap: "Snapshot", *, title: str | None = None, losses: "Sequence[float]" = (),
                 last_line: str | None = None, running_for: float | None = None) -> Panel:
    """One calm screen: the stage checklist, then loss (with its curve), speed and ETA, spend
    against the budget as a bar, and the agent's last log line."""
    snap = checked(snap)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", min_width=6, no_wrap=True)
    grid.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
    if snap.loss is not None:
        grid.add_row("loss", Text.assemble(f"{snap.loss:.4f}  ", (sparkline(losses), "cyan")))
    if snap.s_per_step is not None or snap.eta_s is not None:
        speed = "-" if snap.s_per_step is None else f"{snap.s_per_step:.2f} s/step"
        grid.add_row("speed", Text(f"{speed}   ETA {duration(snap.eta_s)}"))
    spend = Table.grid(padding=(0, 1))
    spend.add_row(bar(snap.spend_usd, snap.budget_usd or 0.0, width=16),
                  Text(f"{money(snap.spend_usd)} of {money(snap.budget_usd)}"
                       + (f"  (${snap.price_per_hour:.3f}/h, {duration(snap.elapsed_s)})"
                          if snap.price_per_hour else ""), style=""))
    grid.add_row("spend", spend)
    if snap.stop_requested:
        grid.add_row("stop", "requested: the agent checkpoints and publishes")
    if snap.status.get("wandb_url"):
        grid.add_row("W&B", Text(plain(snap.status["wandb_url"])))
    if snap.error:
        grid.add_row("error", Text(plain(snap.error), style="red"))
    if last_line:
        grid.add_row("log", Text(plain(last_line), style="dim", overflow="ellipsis",
                                 no_wrap=True))
    state = plain(snap.agent_state or "starting", limit=20)
    stages = checklist(stage_rows(snap.status, snap.stage), snap, running_for=running_for)
    return Panel(Group(stages, Text(""), grid),
                 title=Text(title or plain(snap.run_id, limit=80)), title_align="left",
                 subtitle=Text(state), subtitle_align="right", width=PANEL_WIDTH)


def progress_line(snap: "Snapshot") -> str:
    """Training progress as one plain line (the view off a terminal)."""
    parts = [f"{label(snap.stage) or 'run'} {snap.step}/{snap.total or '?'}"]
    if snap.total:
        parts[0] += f" ({100 * (snap.step or 0) / snap.total:.0f}%)"
    if snap.loss is not None:
        parts.append(f"loss {snap.loss:.4f}")
    if snap.s_per_step is not None:
        parts.append(f"{snap.s_per_step:.2f} s/step")
    if snap.eta_s is not None:
        parts.append(f"ETA {duration(snap.eta_s)}")
    parts.append(f"spend {money(snap.spend_usd)} of {money(snap.budget_usd)}")
    return ", ".join(parts)


def stage_line(row: "StageRow") -> str:
    """A stage that started or ended, as one plain line: ``ingest done in 0s: 12 images``."""
    if row.state == "running":
        return f"{row.label} started"
    took = f" in {duration(row.seconds)}" if row.seconds is not None else ""
    return f"{row.label} {row.state}{took}" + (f": {row.fact}" if row.fact else "")


class LiveView:
    """The orchestrator's reporter for people.

    On a terminal: one panel, redrawn in place (the stage checklist, progress, loss curve,
    spend bar, last log line); notes scroll above it, and so do the raw agent and trainer lines
    with ``show_logs`` (``-v``). Elsewhere (a pipe, CI): one plain line per event (a stage
    started or ended, training progress every ``progress_every`` of the steps or
    ``progress_s`` seconds, a note), never a redraw.
    """

    def __init__(self, console: Console, *, show_logs: bool = False,
                 clock: Callable[[], float] = time.time, progress_every: float = 0.1,
                 progress_s: float = 60.0) -> None:
        self.console = console
        self.show_logs = show_logs
        self.clock = clock
        self.progress_every = progress_every
        self.progress_s = progress_s
        self._live: Live | None = None
        self._wandb_url: str | None = None
        self._last_line: str | None = None
        self._losses: list[float] = []
        self._loss_step: int | None = None
        self._running: tuple[str, float] | None = None  # (stage, first seen at) by our clock
        self._told: dict[str, str] = {}  # stage -> the state a line was printed for
        self._progress: tuple[int, float] | None = None  # (step, at) of the last progress line

    def __enter__(self) -> "LiveView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()  # the last panel stays on screen, the summary goes below it
            self._live = None

    def note(self, text: str) -> None:
        self.console.print(Text(f"- {plain(text, limit=1000)}", style="cyan"), soft_wrap=True)

    def log(self, lines: list[str]) -> None:
        if lines:
            self._last_line = lines[-1]
        if self.show_logs:
            for line in lines:
                self.console.print(Text(plain(line, limit=2000), style="dim"), soft_wrap=True)

    def _remember(self, snap: "Snapshot") -> float | None:
        """Keep the loss curve and when the running stage began; returns its running time."""
        if snap.loss is not None and snap.step is not None and snap.step != self._loss_step:
            self._loss_step = snap.step
            self._losses = (self._losses + [float(snap.loss)])[-MAX_LOSSES:]
        if not snap.stage:
            self._running = None
            return None
        if self._running is None or self._running[0] != snap.stage:
            self._running = (snap.stage, self.clock())
        return self.clock() - self._running[1]

    def update(self, snap: "Snapshot") -> None:
        snap = checked(snap)
        url = snap.status.get("wandb_url")
        if isinstance(url, str) and url and url != self._wandb_url:  # once: easy to click, copy
            self._wandb_url = url
            self.note(f"Weights & Biases: {url}")
        running_for = self._remember(snap)
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False)
                self._live.start()
            self._live.update(status_panel(snap, losses=self._losses, last_line=self._last_line,
                                           running_for=running_for), refresh=True)
            return
        for row in stage_rows(snap.status, snap.stage):
            if row.state != "pending" and self._told.get(row.stage) != row.state:
                self._told[row.stage] = row.state
                self.console.print(Text(stage_line(row)), soft_wrap=True)
        if snap.stage and snap.step is not None and self._progress_due(snap):
            self.console.print(Text(progress_line(snap)), soft_wrap=True)

    def _progress_due(self, snap: "Snapshot") -> bool:
        """A progress line when the step has moved by ``progress_every`` of the total (and at the
        last step), or ``progress_s`` seconds after the previous one."""
        step, now = int(snap.step or 0), self.clock()
        if self._progress is not None and step == self._progress[0]:
            return False
        last_step, last_at = self._progress or (0, now - self.progress_s)
        every = max(1, int((snap.total or 0) * self.progress_every))
        if step // every != last_step // every or step == snap.total \
                or now - last_at >= self.progress_s:
            self._progress = (step, now)
            return True
        return False


def render_summary(console: Console, outcome: "Outcome") -> None:
    """What the user reads at the end: where the bundle is and what it cost."""
    if outcome.detached:
        console.print(f"[bold]{escape(outcome.run_id)}[/] runs on its own now.\n"
                      f"  follow it:  flux-remote resume {escape(outcome.run_id)}\n"
                      f"  stop it:    flux-remote stop {escape(outcome.run_id)}")
        return
    style = ("green" if outcome.state == "done" else
             "yellow" if outcome.ok or outcome.state == "budget" else "red")
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
            ("instance", run.get("instance_state") or "none"), ("stage", label(run.get("stage")) or "-"),
            ("step", step), ("loss", loss_text(run.get("loss"))),
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
        snap = checked(snap) if snap is not None else None
        step, total = (snap.step, snap.total) if snap is not None else (row.get("step"),
                                                                        row.get("total"))
        loss = snap.loss if snap is not None else row.get("loss")
        spend = snap.spend_usd if snap is not None else row.get("spend_usd")
        stage = snap.stage if snap is not None else row.get("stage")
        table.add_row(Text(plain(row["name"], limit=80)), Text(batch_state(row)),
                      Text(label(stage) or "-"), "-" if step is None else f"{step}/{total or '?'}",
                      loss_text(loss), money(spend),
                      duration(snap.eta_s) if snap is not None else "-")
    return table


def batch_board(rows: list[dict[str, Any]], ledger: dict[str, Any], *, title: str,
                snaps: dict[str, Any] | None = None) -> Group:
    """The live board of a batch: its table, then what it spent against its budget as a bar."""
    spend = Table.grid(padding=(0, 1))
    spend.add_row(Text("spend", style="bold"),
                  bar(ledger.get("spent_usd") or 0.0, ledger.get("total_usd") or 0.0, width=16),
                  Text(f"{money(ledger.get('spent_usd'))} of {money(ledger.get('total_usd'))}"))
    return Group(batch_table(rows, ledger, title=title, snaps=snaps), spend)


def batch_state(row: dict[str, Any]) -> str:
    """A batch run's state in words: the slot's while not active, a skipped run's reason."""
    if row["slot_state"] == "skipped":
        return plain(row.get("note") or "skipped: budget")
    return plain(row["slot_state"] if row["slot_state"] != "active" else row["state"], limit=40)


def batch_line(row: dict[str, Any]) -> str:
    """One run of a batch as a log line (the non-terminal view prints it when it changes):
    ``a: running, train 3/8``."""
    stage = label(row.get("stage"))
    step = "" if row.get("step") is None else f" {row['step']}/{row.get('total') or '?'}"
    where = f", {stage}{step}" if stage else ""
    return f"{plain(row['name'], limit=80)}: {batch_state(row)}{where}"


def _batch_key(row: dict[str, Any], every: float) -> tuple[Any, ...]:
    """What must change for a batch run's line to be printed again: its state, its stage, or
    its step by ``every`` of the total (and the last step)."""
    step, total = row.get("step"), row.get("total")
    bucket = step
    if isinstance(step, int) and isinstance(total, int) and total > 0 and step < total:
        bucket = step // max(1, int(total * every))
    return batch_state(row), row.get("stage"), bucket


class BatchView:
    """The live view of a batch: a table on a terminal; elsewhere a line per run whenever its
    state or stage changes or its training moves on by ``progress_every`` of the steps."""

    def __init__(self, console: Console, *, title: str, progress_every: float = 0.1) -> None:
        self.console = console
        self.title = title
        self.progress_every = progress_every
        self._live: Live | None = None
        self._keys: dict[str, tuple[Any, ...]] = {}

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, rows: list[dict[str, Any]], ledger: dict[str, Any],
             snaps: dict[str, Any] | None = None, notes: list[tuple[str, str]] = ()) -> None:
        for name, text in notes:
            self.console.print(Text(f"- {plain(name, limit=80)}: {plain(text, limit=1000)}",
                                    style="cyan"), soft_wrap=True)
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(batch_board(rows, ledger, title=self.title, snaps=snaps),
                              refresh=True)
            return
        for row in rows:
            key = _batch_key(row, self.progress_every)
            if self._keys.get(row["name"]) != key:
                self._keys[row["name"]] = key
                self.console.print(Text(batch_line(row)), soft_wrap=True)


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
