import io
from types import SimpleNamespace

from rich.console import Console

from controller.run.follow import Snapshot
from controller.run.orchestrator import Outcome
from controller.providers.base import Estimate
from controller.ui import (LiveView, cost_table, duration, orphans_table, plan_table,
                           render_summary, run_detail, runs_table, sparkline, status_panel)


def render(*items) -> str:
    console = Console(file=io.StringIO(), width=100)
    for item in items:
        console.print(item)
    return console.file.getvalue()


def offer(offer_id: int, gpu: str, dph: float, hours: float) -> SimpleNamespace:
    return SimpleNamespace(offer_id=offer_id, gpu_name=gpu, num_gpus=1, dph_total=dph,
                           est_hours=hours, est_usd=dph * hours)


def test_plan_table_marks_the_chosen_offer() -> None:
    a, b = offer(1, "RTX 4090", 0.35, 2.0), offer(2, "A100", 1.2, 0.8)
    plan = SimpleNamespace(offers=[a, b], chosen=a)
    est = Estimate(provider="vast", price_per_hour=0.35, est_usd=0.7, est_hours=2.0, plan=plan)
    text = render(plan_table(est, budget_usd=5))
    assert "budget $5.00" in text
    line = next(line for line in text.splitlines() if "RTX 4090" in line)
    assert "->" in line and "$0.70" in line
    assert "->" not in next(line for line in text.splitlines() if "A100" in line)


def test_plan_table_for_own_hardware() -> None:
    est = Estimate(provider="local", price_per_hour=0.0, est_usd=0.0, est_hours=None)
    text = render(plan_table(est, budget_usd=1))
    assert "local" in text and "$0.00" in text


def stages(**states: str) -> dict:
    """A status.json ``stages`` map: each named stage in that state, 2 s long once ended."""
    details = {"ingest": {"totals": {"files": 12, "ingested": 12, "unusable": 0}},
               "quality_gate": {"passed": True, "usable": 12, "excluded": 0, "warnings": []}}
    return {name: {"state": state, "started_at": 100.0,
                   "ended_at": None if state == "running" else 102.0,
                   "detail": details.get(name)} for name, state in states.items()}


def test_status_panel_shows_the_checklist_progress_loss_and_spend() -> None:
    snap = Snapshot(run_id="r1", agent_state="running", stage="train", step=40, total=80,
                    loss=0.1234, s_per_step=1.5, eta_s=60, spend_usd=0.42, budget_usd=5,
                    price_per_hour=0.35, elapsed_s=3700, stop_requested=True,
                    status={"stages": stages(checks="done", ingest="done", quality_gate="done",
                                             train="running")})
    text = render(status_panel(snap, losses=[0.5, 0.4, 0.2, 0.1234],
                               last_line="Saving at step 40"))
    for part in ("✓ ingest", "12 images", "12/12 images pass", "▸ train", "40/80", "50%",
                 "· publish", "0.1234", "█▆▂▁", "1.50 s/step", "ETA 1m00s",
                 "$0.42 of $5.00",
                 "$0.350/h", "1h01m", "requested", "Saving at step 40"):
        assert part in text, part
    assert "━" in next(line for line in text.splitlines() if "$0.42 of $5.00" in line)
    assert "None" not in text and "{" not in text


def test_sparkline_scales_between_the_lowest_and_the_highest_value() -> None:
    assert sparkline([]) == "" and sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert len(sparkline([float(i) for i in range(100)], width=10)) == 10
    assert sparkline([1.0, float("nan"), 0.0]) == "█▁"


def test_a_running_stage_other_than_training_shows_how_long_it_runs() -> None:
    now = [1000.0]
    console = terminal()
    view = LiveView(console, clock=lambda: now[0])
    snap = Snapshot(run_id="r", agent_state="running", stage="bootstrap",
                    status={"stages": stages(checks="done", bootstrap="running")})
    view.update(snap)
    now[0] += 75
    view.update(snap)
    view.close()
    assert "running 1m15s" in console.file.getvalue()


def test_live_view_off_terminal_prints_one_plain_line_per_event() -> None:
    now = [0.0]
    console = Console(file=io.StringIO(), width=100)
    view = LiveView(console, clock=lambda: now[0])
    view.note("renting offer 1")
    view.log(["[agent] stage train: started"])  # raw lines: only with show_logs (-v)
    view.update(Snapshot(run_id="r", agent_state="running", stage="ingest",
                         status={"stages": stages(checks="done", ingest="running")}))
    done = stages(checks="done", ingest="done", quality_gate="done", train="running")
    for step in (1, 2, 3, 9, 10, 10, 11, 30, 100):
        now[0] += 2
        view.update(Snapshot(run_id="r", agent_state="running", stage="train", step=step,
                             total=100, loss=0.5, spend_usd=0.01 * step, budget_usd=1,
                             status={"stages": done}))
    now[0] += 61  # a minute without a 10% step still gives one line
    view.update(Snapshot(run_id="r", agent_state="running", stage="train", step=101,
                         total=200, spend_usd=1, budget_usd=1, status={"stages": done}))
    view.close()
    lines = console.file.getvalue().splitlines()
    assert lines == [
        "- renting offer 1",
        "checks done in 2s",
        "ingest started",
        "ingest done in 2s: 12 images",
        "quality gate done in 2s: 12/12 images pass",
        "train started",
        "train 1/100 (1%), loss 0.5000, spend $0.01 of $1.00",
        "train 10/100 (10%), loss 0.5000, spend $0.10 of $1.00",
        "train 30/100 (30%), loss 0.5000, spend $0.30 of $1.00",
        "train 100/100 (100%), loss 0.5000, spend $1.00 of $1.00",
        "train 101/200 (50%), spend $1.00 of $1.00",
    ]
    assert "\x1b[" not in console.file.getvalue()


def test_raw_agent_lines_show_only_when_verbose() -> None:
    quiet, loud = (Console(file=io.StringIO(), width=100) for _ in range(2))
    LiveView(quiet).log(["[agent] stage train: started"])
    LiveView(loud, show_logs=True).log(["[agent] stage train: started"])
    assert quiet.file.getvalue() == ""
    assert "stage train: started" in loud.file.getvalue()


def test_instance_text_cannot_drive_the_terminal_or_inject_markup() -> None:
    console = terminal()
    view = LiveView(console, show_logs=True)
    view.log(["\x1b]0;pwned\x07[bold red]fake[/] \x1b[2Jline"])
    view.update(Snapshot(run_id="r", agent_state="failed\x1b[31m", stage="train",
                         error="[link=http://x]boom[/link]\x1b[2J",
                         status={"stages": {"train": {"state": "failed", "detail": {
                             "error": "no\x1b[2J [red]space[/red]"}}}}))
    view.close()
    text = console.file.getvalue()
    assert "pwned" not in text and "\x1b[2J" not in text and "\x1b]" not in text
    assert "[bold red]fake[/]" in text and "[link=http://x]boom[/link]" in text
    assert "[red]space[/red]" in text


def test_summary_says_where_the_bundle_is_and_what_it_cost() -> None:
    done = Outcome(run_id="r1", state="done", out_dir="/tmp/b", bundle="/tmp/b", spend_usd=0.5,
                   est_usd=0.6, budget_usd=5, receipt={"idle_after_training_s": 12,
                                                       "idle_after_training_usd": 0.001})
    console = Console(file=io.StringIO(), width=100)
    render_summary(console, done)
    text = console.file.getvalue()
    assert "/tmp/b (verified)" in text and "$0.50 metered" in text and "12s" in text
    console = Console(file=io.StringIO(), width=100)
    render_summary(console, Outcome(run_id="r2", state="running", detached=True))
    assert "flux-remote resume r2" in console.file.getvalue()
    console = Console(file=io.StringIO(), width=100)
    render_summary(console, Outcome(run_id="r3", state="failed", error="gate failed"))
    assert "gate failed" in console.file.getvalue()


def test_summary_of_a_run_the_budget_ended_is_yellow_with_its_reason() -> None:
    ended = Outcome(run_id="r4", state="budget", bundle="/tmp/b", spend_usd=2.9, budget_usd=3,
                    error="budget: the agent did not stop within 300 s")
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    render_summary(console, ended)
    text = console.file.getvalue()
    assert "\x1b[33mbudget " in text  # yellow: what fitted came home, not a failure
    assert "did not stop within 300 s" in text and "/tmp/b (verified)" in text


def test_tables() -> None:
    run = {"run_id": "r1", "state": "done", "provider": "vast", "gpu_name": "RTX 4090",
           "instance_state": "destroyed", "spend_usd": 0.5, "budget_usd": 5.0, "created_at": 0,
           "est_usd": 0.4, "step": 3, "total": 4, "loss": 0.5, "out_dir": "/o", "error": None}
    assert "RTX 4090" in render(runs_table([run], now=7200))
    assert "2h00m" in render(runs_table([run], now=7200))
    detail = render(run_detail(run, now=60))
    assert "3/4" in detail and "destroyed" in detail
    costs = render(cost_table([run, {**run, "run_id": "r2", "spend_usd": 1.0}]))
    assert "total" in costs and "$1.50" in costs
    assert "123" in render(orphans_table([{"instance_id": 123, "label": "flux-remote:x"}]))
    assert duration(None) == "-" and duration(5) == "5s"


def terminal() -> Console:
    """A console that believes it is a terminal (what a user's shell gives rich)."""
    return Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")


def test_live_view_on_a_terminal_redraws_one_panel_and_scrolls_notes_above_it() -> None:
    console = terminal()
    view = LiveView(console, show_logs=True)
    view.note("renting offer 1")
    for step in (1, 2):
        view.update(Snapshot(run_id="r", agent_state="running", stage="train", step=step,
                             total=2, loss=0.5, spend_usd=0.1 * step, budget_usd=5))
        view.log([f"[agent] line {step}"])
    assert view._live is not None and view._live.is_started  # one live region, redrawn
    view.close()
    text = console.file.getvalue()
    assert "\x1b[" in text  # drawn with terminal control codes, not printed as lines
    assert "- renting offer 1" in text and "[agent] line 2" in text
    assert "2/2" in text and "$0.20 of $5.00" in text
    assert view._live is None


def test_batch_view_on_a_terminal_draws_the_table() -> None:
    from controller.ui import BatchView

    console = terminal()
    view = BatchView(console, title="batch sw")
    rows = [{"name": "a", "run_id": "a-1", "slot_state": "active", "state": "running",
             "stage": "train", "step": 3, "total": 8, "loss": 0.5, "spend_usd": 0.1,
             "note": None}]
    view.show(rows, {"spent_usd": 0.1, "committed_usd": 1.1, "total_usd": 3.0},
              notes=[("a", "renting offer 7")])
    view.close()
    text = console.file.getvalue()
    assert "\x1b[" in text and "batch sw" in text and "3/8" in text
    assert "- a: renting offer 7" in text


def test_batch_board_shows_stage_names_a_spend_bar_and_no_none() -> None:
    from controller.ui import batch_board, batch_line

    rows = [{"name": "a", "run_id": "a-1", "slot_state": "active", "state": "running",
             "stage": "quality_gate", "step": None, "total": None, "loss": None,
             "spend_usd": None, "note": None},
            {"name": "b", "run_id": None, "slot_state": "skipped", "state": "skipped",
             "stage": None, "note": None}]
    text = render(batch_board(rows, {"spent_usd": 1.5, "committed_usd": 2.0, "total_usd": 3.0},
                              title="batch sw"))
    assert "quality gate" in text and "skipped: budget" in text
    assert "━" in next(line for line in text.splitlines() if "$1.50 of $3.00" in line)
    assert "None" not in text
    assert [batch_line(row) for row in rows] == ["a: running, quality gate",
                                                 "b: skipped: budget"]


def test_batch_view_off_terminal_prints_a_run_again_only_when_it_moved_on() -> None:
    from controller.ui import BatchView

    console = Console(file=io.StringIO(), width=100)
    view = BatchView(console, title="batch sw")
    ledger = {"spent_usd": 0.1, "committed_usd": 1.0, "total_usd": 3.0}
    row = {"name": "a", "run_id": "a-1", "slot_state": "active", "state": "running",
           "stage": "train", "step": 1, "total": 100, "note": None}
    for step in (1, 2, 5, 9, 10, 11, 55, 100, 100):
        view.show([{**row, "step": step}], ledger)
    view.show([{**row, "step": 100, "stage": "publish"}], ledger)
    assert console.file.getvalue().splitlines() == [
        "a: running, train 1/100", "a: running, train 10/100", "a: running, train 55/100",
        "a: running, train 100/100", "a: running, publish 100/100"]


def test_numbers_of_the_wrong_type_from_the_instance_draw_as_unknown() -> None:
    console = terminal()
    view = LiveView(console)
    bad = Snapshot(run_id="r", agent_state="running", stage=["train"], step="40", total=0,
                   loss="0.1", s_per_step=float("nan"), eta_s=True, status=[1])  # type: ignore
    view.update(bad)
    plain_console = Console(file=io.StringIO(), width=100)
    LiveView(plain_console).update(bad)
    view.close()
    for text in (console.file.getvalue(), plain_console.file.getvalue()):
        assert "None" not in text and "nan" not in text and "['train']" not in text


def test_a_long_loss_history_is_averaged_into_the_sparkline_width() -> None:
    falling = [10.0 - i / 100 for i in range(1000)]
    line = sparkline(falling, width=8)
    assert len(line) == 8 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)
