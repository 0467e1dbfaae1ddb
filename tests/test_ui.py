import io
from types import SimpleNamespace

from rich.console import Console

from controller.run.follow import Snapshot
from controller.run.orchestrator import Outcome
from controller.providers.base import Estimate
from controller.ui import (LiveView, cost_table, duration, orphans_table, plan_table,
                           render_summary, run_detail, runs_table, status_panel)


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


def test_status_panel_shows_progress_and_spend() -> None:
    snap = Snapshot(run_id="r1", agent_state="running", stage="train", step=40, total=80,
                    loss=0.1234, s_per_step=1.5, eta_s=60, spend_usd=0.42, budget_usd=5,
                    price_per_hour=0.35, elapsed_s=3700, stop_requested=True)
    text = render(status_panel(snap))
    for part in ("train (running)", "40/80", "0.1234", "1.50", "1m00s", "$0.42 of $5.00",
                 "$0.350/h", "1h01m", "requested"):
        assert part in text, part


def test_live_view_off_terminal_prints_lines_once_per_step() -> None:
    console = Console(file=io.StringIO(), width=100)
    view = LiveView(console)
    view.note("renting offer 1")
    view.log(["[agent] stage train: started"])
    for spend in (0.1, 0.2):
        view.update(Snapshot(run_id="r", stage="train", step=1, total=2, spend_usd=spend))
    view.update(Snapshot(run_id="r", stage="train", step=2, total=2, spend_usd=0.3))
    view.close()
    text = console.file.getvalue()
    assert "- renting offer 1" in text and "stage train: started" in text
    assert text.count("step 1/2") == 1 and text.count("step 2/2") == 1


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
    view = LiveView(console)
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
