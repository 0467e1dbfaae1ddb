"""The launch steps as a library (``controller.run.launch``, ``controller.dataset_check``): what the
CLI and the notebook both call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.dataset_check import check_arguments, checks_for, run_checks
from controller.errors import BudgetError, SpecError
from controller.journal import open_journal
from controller.run.launch import check_budget, drive_interactive, machine_checks, plan_run
from controller.run.orchestrator import Options
from controller.providers.base import Estimate
from controller.spec.model import RunSpec
from tests.fixtures_data import TRIGGER

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make_spec(dataset: Path, **extra: Any) -> RunSpec:
    return RunSpec.model_validate({"name": "api", "trigger_word": TRIGGER,
                                   "dataset": {"path": str(dataset)}, "budget": {"max_usd": 2.0},
                                   **extra})


# ---- machine checks --------------------------------------------------------------------------

def test_machine_checks_for_vast_name_what_is_missing(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, publish={"hf_repo": "alice/x"}, wandb={"enabled": True})
    checks = {c.name: c for c in machine_checks(
        spec, env={}, which=lambda tool: None if tool == "rsync" else f"/usr/bin/{tool}")}
    assert checks["ssh"].ok and checks["ssh"].result == "/usr/bin/ssh"
    assert not checks["rsync"].ok and "install" in checks["rsync"].result
    assert not checks["Vast.ai key"].ok  # the autouse fixture hides the real key
    assert not checks["HF_TOKEN"].ok and "gated" in checks["HF_TOKEN"].result
    assert not checks["HF_TOKEN (publish)"].ok
    assert checks["WANDB_API_KEY"].ok and "WANDB_MODE=online" in checks["WANDB_API_KEY"].result


def test_machine_checks_for_local_need_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", "k" * 16)
    assert [c.name for c in machine_checks(make_spec(tmp_path, provider="local"), env={})] == [
        "python"]
    vast = {c.name: c for c in machine_checks(make_spec(tmp_path, base_model="flux-schnell"),
                                              env={"HF_TOKEN": "x"}, which=lambda t: t)}
    assert vast["Vast.ai key"].ok and "HF_TOKEN" not in vast  # schnell is not gated


# ---- budget and planning ---------------------------------------------------------------------

def test_check_budget_refuses_an_estimate_over_the_budget(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    check_budget(spec, Estimate(provider="vast", price_per_hour=1.0, est_usd=2.0, est_hours=2.0))
    check_budget(spec, Estimate(provider="ssh", price_per_hour=0.0, est_usd=None, est_hours=None))
    with pytest.raises(BudgetError, match=r"estimated \$2.50 exceeds the budget \$2.00"):
        check_budget(spec, Estimate(provider="vast", price_per_hour=1.0, est_usd=2.5,
                                    est_hours=2.5))


def test_plan_run_for_the_local_provider(small_dataset: Path) -> None:
    orch, estimate = plan_run(make_spec(small_dataset, provider="local"), open_journal())
    assert estimate.provider == "local" and estimate.est_usd == 0.0
    assert orch.provider.name == "local"


def test_plan_run_on_vast_rents_nothing(small_dataset: Path, fake_vast: Any) -> None:
    orch, estimate = plan_run(make_spec(small_dataset), open_journal())
    assert estimate.provider == "vast" and 0 < estimate.est_usd <= 2.0
    with pytest.raises(BudgetError):  # no offer fits a cent
        plan_run(make_spec(small_dataset, budget={"max_usd": 0.01}), open_journal())
    assert fake_vast.instances == {}


# ---- Ctrl-C ----------------------------------------------------------------------------------

class Interrupted:
    """Stands in for the Orchestrator: the first drive is interrupted by Ctrl-C."""

    def __init__(self, state: str) -> None:
        self._state = state
        self.calls: list[str] = []
        self.reporter = self

    def close(self) -> None:
        self.calls.append("close")

    def drive(self, run_id: str, options: Options, estimate: Any = None) -> str:
        self.calls.append(f"drive detach={options.detach}")
        if self.calls.count("close") == 0:
            raise KeyboardInterrupt
        return "finished"

    def state(self, run_id: str) -> str:
        return self._state

    def outcome(self, run_id: str, *, detached: bool = False) -> str:
        return "detached" if detached else "ended"

    def down(self, run_id: str, *, force: bool = False) -> str:
        assert force
        return "released"

    def request_stop(self, run_id: str) -> None:
        self.calls.append("stop")


@pytest.mark.parametrize("state, ask, expected", [
    ("running", None, "detached"),  # the notebook, `launch --yes`
    ("running", lambda: False, "detached"),
    ("running", lambda: True, "finished"),  # STOP written, then followed to its end
    ("booting", lambda: True, "released"),  # nothing runs on it: never left billing idle
    ("shipping", None, "released"),
    ("done", None, "ended"),
])
def test_ctrl_c(state: str, ask: Any, expected: str) -> None:
    orch = Interrupted(state)
    assert drive_interactive(orch, "r", Options(detach=True), ask_stop=ask) == expected
    assert orch.calls[:2] == ["drive detach=True", "close"]  # the live view closed before asking
    if expected == "finished":
        assert orch.calls[2:] == ["stop", "drive detach=False"]


# ---- dataset checks --------------------------------------------------------------------------

def test_checks_for_a_spec_a_file_and_a_folder(small_dataset: Path) -> None:
    spec = make_spec(small_dataset, quality_gate={"min_images": 3})
    [(label, kwargs)] = checks_for(spec)
    assert label == str(small_dataset) and kwargs == check_arguments(spec)
    assert kwargs["gate"]["min_images"] == 3 and kwargs["trigger"] == TRIGGER
    assert checks_for(small_dataset) == [(str(small_dataset), {"directory": small_dataset})]
    [(label, kwargs)] = checks_for(str(CONFIGS / "demo-local.yaml"))
    assert label.endswith("demo-local.yaml (demo-local)") and kwargs["caption_mode"] == "template"
    with pytest.raises(SpecError, match="no such file or folder"):
        checks_for(small_dataset / "nothing")


def test_run_checks_report_like_the_cli(small_dataset: Path) -> None:
    [(label, report)] = run_checks(make_spec(small_dataset))
    assert label == str(small_dataset)
    assert report["passed"] and report["gate"]["usable_count"] == 12
