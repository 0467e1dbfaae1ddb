"""``training.resume_from_checkpoint`` (auto / none / a path) and ``budget.on_cap: hard_stop``.

Unit tests arrange an output folder by hand; the agent tests run ``python -m remote run`` with the
real tiny trainer on the 12-image ``small_dataset`` (few steps, 32 px); the hard stop is shown with
the fake ai-toolkit script of ``test_train_supervision.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from controller.spec.model import RunSpec
from remote.costguard import CostGuard
from remote.plan import load_plan, make_plan, write_json_atomic
from remote.resume import (MARKER, ResumeError, ResumePolicy, copy_with_step, inspect_source,
                           lora_is_whole, optimizer_is_whole, read_marker, run_rank,
                           set_aside_unloadable, setting_of)
from remote.runner import Runner, trainer_pids
from remote.status import read_events, read_status
from remote.train import default_stop_policy, run_training
from remote.trainers import checkpoints as ck
from remote.trainers.lora import inject_lora, lora_state_dict
from remote.trainers.model import build_base_model
from tests.aitk_standin import MODULES as STANDIN_MODULES
from tests.aitk_standin import SCRIPT as STANDIN
from tests.test_runner import agent, run_agent, tiny_spec, wait_for
from tests.test_train_supervision import Recorder, fake_ctx

NAME = "demo_lora"  # tiny_spec's name


def tiny_lora(path: Path, *, rank: int = 4, step: int | None = 6,
              dtype: torch.dtype = torch.float16) -> Path:
    """A LoRA file the tiny trainer can load (``step`` None: no training_info metadata)."""
    model = build_base_model()
    inject_lora(model, rank, rank)
    tensors = lora_state_dict(model, dtype)
    metadata = {"name": "earlier"}
    if step is not None:
        metadata["training_info"] = json.dumps({"step": step, "epoch": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def policy(tmp_path: Path, setting: str, *, run_id: str = "r1", rank: int = 4) -> ResumePolicy:
    return ResumePolicy(setting, run_dir=tmp_path / "run", run_id=run_id,
                        dataset_dir=tmp_path / "dataset",
                        output_dir=tmp_path / "run" / "out" / NAME, name=NAME, rank=rank,
                        clock=lambda: 1_800_000_000.0)


def earlier_attempt(out: Path) -> set[str]:
    """What an earlier attempt leaves in the output folder (content does not matter here)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir()
    (out / "samples" / "1__000000004_0.jpg").write_bytes(b"jpg")
    for name in (f"{NAME}_000000004.safetensors", f"{NAME}.safetensors", "optimizer.pt"):
        (out / name).write_bytes(b"old")
    (out / "config.yaml").write_text("job: extension\n")
    return {f"{NAME}_000000004.safetensors", f"{NAME}.safetensors", "optimizer.pt", "samples"}


# -- the policy on its own --------------------------------------------------------------------
def test_auto_arranges_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run" / "out" / NAME
    earlier_attempt(out)
    auto = policy(tmp_path, "auto")
    assert auto.mode == "auto" and not auto.pending()
    assert auto.apply() is None and auto.check() is None
    assert (out / "optimizer.pt").is_file() and not (tmp_path / "run" / MARKER).exists()
    assert setting_of({"training": {}}) == "auto"
    assert setting_of({"training": {"resume_from_checkpoint": "none"}}) == "none"


def test_none_sets_the_earlier_attempt_aside_once(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "out" / NAME
    moved = earlier_attempt(out)
    (out / "previous-19990101-000000").mkdir()  # an older set-aside stays where it is
    fresh = policy(tmp_path, "none")
    assert fresh.pending()
    record = fresh.apply()
    aside = out / "previous-20270115-080000"
    assert record["set_aside"] == str(aside) and set(record["moved"]) == moved
    assert {p.name for p in aside.iterdir()} == moved  # nothing deleted
    assert (aside / "samples" / "1__000000004_0.jpg").read_bytes() == b"jpg"
    assert {p.name for p in out.iterdir()} == {"config.yaml", aside.name,
                                               "previous-19990101-000000"}
    assert ck.newest_checkpoint(out, NAME) is None  # a trainer starts at step 0
    assert read_marker(tmp_path / "run")["run_id"] == "r1"

    # the agent restarts on the same plan: its own checkpoints are resumed, not set aside
    (out / f"{NAME}_000000002.safetensors").write_bytes(b"new")
    assert not fresh.pending() and fresh.apply() is None
    assert (out / f"{NAME}_000000002.safetensors").is_file()
    # another run in the same run dir applies it again, into a folder of its own
    again = policy(tmp_path, "none", run_id="r2").apply()
    assert again["moved"] == [f"{NAME}_000000002.safetensors"]
    assert again["set_aside"].endswith("previous-20270115-080000-2")


def test_a_path_is_placed_as_the_newest_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    source = tiny_lora(tmp_path / "dataset" / "resume.safetensors", step=6)
    out = tmp_path / "run" / "out" / NAME
    moved = earlier_attempt(out)
    record = policy(tmp_path, "resume.safetensors").apply()  # relative: in the dataset folder
    placed = out / f"{NAME}_000000006.safetensors"
    assert record["checkpoint"] == str(placed) and record["step"] == 6
    assert record["source"] == str(source) and set(record["moved"]) == moved
    assert ck.newest_checkpoint(out, NAME) == (placed, 6)
    assert not (out / "optimizer.pt").exists()  # the optimizer starts fresh
    assert source.is_file()  # copied, not moved
    assert not policy(tmp_path, "resume.safetensors").pending()


def test_a_lora_without_training_info_starts_at_step_0(tmp_path: Path) -> None:
    source = tiny_lora(tmp_path / "elsewhere" / "lora.safetensors", step=None,
                       dtype=torch.bfloat16)
    (tmp_path / "run").mkdir()
    record = policy(tmp_path, str(source)).apply()  # absolute: on the agent's machine
    placed = Path(record["checkpoint"])
    assert placed.name == f"{NAME}_000000000.safetensors" and record["step"] == 0
    assert ck.read_step(placed) == 0  # written into the copy, so both trainers read it
    with safe_open(str(placed), framework="pt") as fh:
        assert fh.metadata()["name"] == "earlier"
    before, after = load_file(str(source)), load_file(str(placed))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.bfloat16
               for k in before)
    assert oct(placed.stat().st_mode & 0o777) == "0o644"


def test_copy_with_step_keeps_the_tensors(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"x.lora_A.weight": torch.arange(6.0).reshape(2, 3)}, str(src),
              metadata={"training_info": json.dumps({"step": 3, "epoch": 2})})
    copy_with_step(src, tmp_path / "b.safetensors", 9)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["training_info"]) == {"step": 9, "epoch": 2}
        assert torch.equal(fh.get_tensor("x.lora_A.weight"), torch.arange(6.0).reshape(2, 3))


def test_unusable_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="does not exist"):
        inspect_source(tmp_path / "missing.safetensors", rank=4)
    wrong_rank = tiny_lora(tmp_path / "r8.safetensors", rank=8)
    with pytest.raises(ResumeError, match="rank 8, the spec says 4"):
        inspect_source(wrong_rank, rank=4)
    not_lora = tmp_path / "full.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(ResumeError, match="PEFT naming"):
        inspect_source(not_lora, rank=4)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ResumeError, match="does not load with safetensors"):
        inspect_source(garbage, rank=4)
    # nothing is touched when the source is refused
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "out" / NAME
    earlier_attempt(out)
    with pytest.raises(ResumeError):
        policy(tmp_path, str(wrong_rank)).apply()
    assert (out / "optimizer.pt").is_file() and not (tmp_path / "run" / MARKER).exists()


def test_the_spec_accepts_auto_none_and_safetensors_paths(tmp_path: Path) -> None:
    base = {"name": "x", "dataset": {"path": str(tmp_path)}, "budget": {"max_usd": 1}}

    def training(value: str) -> str:
        spec = RunSpec.model_validate({**base, "training": {"resume_from_checkpoint": value}})
        return spec.training.resume_from_checkpoint

    assert training("auto") == "auto" and training("none") == "none"
    assert training("resume.safetensors") == "resume.safetensors"
    assert training("/data/loras/me_000000500.safetensors").endswith("500.safetensors")
    for bad in ("fresh", "../outside.safetensors", "/x/lora.ckpt"):
        with pytest.raises(ValidationError, match="resume_from_checkpoint"):
            training(bad)


def test_run_rank_follows_overrides() -> None:
    spec = {"name": "x", "training": {"rank": 8}}
    assert run_rank(spec) == 8
    spec["training"]["ai_toolkit"] = {"overrides": {"network.linear": 32}}
    assert run_rank(spec) == 32


# -- hard_stop ----------------------------------------------------------------------------------
def test_hard_stop_does_not_wait_for_the_next_save(tmp_path: Path) -> None:
    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {}, steps=400, save_every=10,
                   stop_now=lambda: bool(rec.progress) and rec.progress[-1].step >= 12)
    assert default_stop_policy(ctx.command) == "after_next_save"
    result = run_training(ctx)
    assert result.state == "stopped" and result.error is None, result.log_tail
    out = tmp_path / "output" / "fake"
    assert result.last_checkpoint == out / "fake_000000010.safetensors"  # what exists
    assert rec.checkpoints == [(out / "fake_000000010.safetensors", 10)]
    assert 12 <= rec.progress[-1].step < 20 and not (out / "fake_000000020.safetensors").exists()
    assert "hard stop: stopping now" in rec.text


def test_hard_stop_cuts_short_a_graceful_wait(tmp_path: Path) -> None:
    # a graceful stop at step 2 would wait for the save at 10; the cap's hard stop at 5 does not
    rec = Recorder(stop_when=lambda r: bool(r.progress) and r.progress[-1].step >= 2)
    ctx = fake_ctx(rec, tmp_path, {}, steps=400, save_every=10,
                   stop_now=lambda: bool(rec.progress) and rec.progress[-1].step >= 5)
    result = run_training(ctx)
    assert result.state == "stopped" and rec.checkpoints == [], result.log_tail
    assert 5 <= rec.progress[-1].step < 10
    assert "stopping after the next checkpoint" in rec.text
    assert "not waiting for the next checkpoint" in rec.text


def test_hard_stop_never_cuts_a_save(tmp_path: Path) -> None:
    out = tmp_path / "output" / "fake"
    saving = out / "fake_000000010.safetensors"
    seen_mid_save = []

    def mid_save() -> bool:  # the LoRA is written, its optimizer state not yet
        if saving.is_file() and not (out / "optimizer.pt").is_file():
            seen_mid_save.append(True)
        return bool(seen_mid_save)

    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_SAVE_DELAY": "0.5"}, steps=400, save_every=10,
                   stop_now=mid_save)
    result = run_training(ctx)
    assert result.state == "stopped" and seen_mid_save
    assert lora_is_whole(saving) and optimizer_is_whole(out / "optimizer.pt")
    assert result.last_checkpoint == saving
    assert not (out / "fake_000000020.safetensors").exists()


def test_graceful_callers_are_unchanged(tmp_path: Path) -> None:
    rec = Recorder(stop_when=lambda r: bool(r.progress) and r.progress[-1].step >= 12)
    result = run_training(fake_ctx(rec, tmp_path, {}, steps=400, save_every=10))
    assert result.state == "stopped"
    assert result.last_checkpoint == tmp_path / "output" / "fake" / "fake_000000020.safetensors"


def test_hard_cost_guard_reserves_only_the_finish() -> None:
    now = [1_000_000.0]
    common = dict(price_per_hour=3.6, budget_usd=1.0, max_hours=None, started_at=now[0],
                  clock=lambda: now[0], reserve_s=100.0)
    graceful, hard = CostGuard(**common), CostGuard(**common, hard=True)
    now[0] += 850  # $0.85 spent; the finish (100 s) costs $0.10 more
    assert hard.check(step=None, s_per_step=None, save_every=None) is None
    assert graceful.check(step=5, s_per_step=1.0, save_every=100) is not None  # save at 100
    now[0] += 60
    reason = hard.check(step=None, s_per_step=None, save_every=None)
    assert reason == "validating and publishing would cost $1.01, over the $1.00 budget"
    plan = {"spec": {"budget": {"max_usd": 1.0, "on_cap": "hard_stop"}}, "budget_usd": 1.0}
    assert CostGuard.from_plan(plan).hard and not CostGuard.from_plan({"spec": {}}).hard


def test_runner_turns_the_cap_into_a_hard_stop(tmp_path: Path, small_dataset: Path) -> None:
    now = [2_000_000.0]
    for on_cap in ("graceful_stop", "hard_stop"):
        spec = tiny_spec(small_dataset)
        spec["budget"]["on_cap"] = on_cap
        plan = make_plan(run_id=on_cap, spec=spec, run_dir=str(tmp_path / on_cap),
                         dataset_dir=str(small_dataset), provider="local", price_per_hour=36.0,
                         billing_started_at=now[0])
        runner = Runner(plan, env={}, clock=lambda: now[0])
        try:
            assert not runner.stop_now() and not runner.stop_requested()
            now[0] += 600  # $6 of $5: the cap is reached even with no progress line
            assert runner.stop_now() is (on_cap == "hard_stop")
            assert runner.stop_requested() is (on_cap == "hard_stop")
            runner.cap_stop("watchdog: cap reached and the controller is silent")
            assert runner.stop_requested() and runner.stop_now() is (on_cap == "hard_stop")
        finally:
            runner.log.close()
            now[0] -= 600
    guard = [e for e in read_events(tmp_path / "hard_stop") if e["event"] == "costguard"]
    assert guard and guard[0]["hard"] is True


# -- the agent with the real tiny trainer -----------------------------------------------------
def plan_for(run_dir: Path, run_id: str, spec: dict, dataset: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    write_json_atomic(path, make_plan(run_id=run_id, spec=spec, run_dir=str(run_dir),
                                      dataset_dir=str(dataset), provider="local"))
    return path


def log_since(run_dir: Path, marker: str) -> str:
    log = (run_dir / "agent.log").read_text()
    return log[log.rindex(marker):]


def test_none_after_an_earlier_run_then_a_restart_continues(tmp_path: Path,
                                                            small_dataset: Path) -> None:
    run_dir = tmp_path / "runs" / "same"
    first = plan_for(run_dir, "r1", tiny_spec(small_dataset, steps=6, save_every=3),
                     small_dataset)
    assert run_agent(first) == 0, (run_dir / "agent.log").read_text()[-3000:]
    out = run_dir / "output" / NAME
    earlier = {p.name for p in out.iterdir()} - {"config.yaml"}
    assert f"{NAME}.safetensors" in earlier and "optimizer.pt" in earlier

    spec = tiny_spec(small_dataset, steps=40, save_every=4, resume_from_checkpoint="none")
    second = plan_for(run_dir, "r2", spec, small_dataset)
    proc = agent(second, {"FLUX_REMOTE_TINY_STEP_DELAY": "0.15"})

    def r2_saved() -> bool:
        status = read_status(run_dir) or {}
        return status.get("run_id") == "r2" and bool(status.get("last_checkpoint"))

    try:
        wait_for(r2_saved, what="r2's first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent, mid-run
        proc.wait()
        for pid in trainer_pids(run_dir / "work" / "config.yaml"):  # and its trainer (own session)
            os.kill(pid, signal.SIGKILL)
    newest = ck.newest_checkpoint(out, NAME)
    assert newest is not None and 4 <= newest[1] < 40
    resumes = [e for e in read_events(run_dir) if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["run_id"] == "r2"
    aside = Path(resumes[0]["set_aside"])
    assert aside.parent == out and {p.name for p in aside.iterdir()} == earlier
    assert ck.read_step(aside / f"{NAME}.safetensors") == 6  # r1's final LoRA, kept
    events = read_events(run_dir)
    since_resume = events[events.index(resumes[0]):]
    first_ckpt = next(e for e in since_resume if e["event"] == "checkpoint")
    assert first_ckpt["step"] == 4  # counted from 0, not from r1's step 6
    assert "Generating baseline samples" in log_since(run_dir, "starting run r2")

    assert run_agent(second) == 0, (run_dir / "agent.log").read_text()[-3000:]
    assert [e["run_id"] for e in read_events(run_dir) if e["event"] == "resume"] == ["r2"]
    restarted = log_since(run_dir, "resuming run r2")
    assert f"Found step {newest[1]} in metadata" in restarted
    assert {p.name for p in aside.iterdir()} == earlier  # still there, untouched
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 40
    assert ck.read_step(run_dir / "publish" / f"{NAME}.safetensors") == 40


def test_a_path_in_the_dataset_folder_resumes_from_its_step(tmp_path: Path,
                                                            small_dataset: Path) -> None:
    source = tiny_lora(small_dataset / "resume.safetensors", step=6)
    spec = tiny_spec(small_dataset, steps=10, save_every=4,
                     resume_from_checkpoint="resume.safetensors")
    plan = plan_for(tmp_path / "runs" / "r1", "r1", spec, small_dataset)
    run_dir = plan.parent
    assert run_agent(plan) == 0, (run_dir / "agent.log").read_text()[-3000:]
    log = (run_dir / "agent.log").read_text()
    assert f"{source} is usable (step 6" in log  # checked in the checks stage
    assert "Found step 6 in metadata, starting from there" in log
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 10
    steps = [e["step"] for e in read_events(run_dir) if e["event"] == "checkpoint"]
    assert steps == [8, 10]
    assert ck.read_step(run_dir / "publish" / f"{NAME}.safetensors") == 10
    skipped = status["stages"]["ingest"]["detail"]["totals"]["skipped"]
    assert skipped == 1  # ingest left the LoRA out of the training images
    assert not list((run_dir / "work").rglob("resume*"))
    assert read_marker(run_dir)["step"] == 6 and source.is_file()


def test_a_rank_mismatch_fails_before_training(tmp_path: Path, small_dataset: Path) -> None:
    lora = tiny_lora(tmp_path / "loras" / "r8.safetensors", rank=8)
    spec = tiny_spec(small_dataset, steps=8, resume_from_checkpoint=str(lora))
    plan = plan_for(tmp_path / "runs" / "r1", "r1", spec, small_dataset)
    run_dir = plan.parent
    runner = Runner(load_plan(plan), env={})
    try:
        assert runner.run() == 1
    finally:
        runner.log.close()
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["cause"] == "resume"
    assert status["stage"] == "checks" and status["stages"]["train"]["state"] == "pending"
    assert "r8.safetensors cannot be resumed from" in status["error"]
    assert "rank 8, the spec says 4" in status["error"]
    assert not (run_dir / "output").exists()


def test_the_agent_hard_stops_an_ai_toolkit_like_trainer_and_publishes(
        tmp_path: Path, small_dataset: Path) -> None:
    """The ai-toolkit stand-in (no save on SIGTERM) saves at step 10, then every 200 steps."""
    spec = tiny_spec(small_dataset, steps=400, save_every=200,
                     command=[sys.executable, str(STANDIN), "{config}"])
    spec["budget"]["on_cap"] = "hard_stop"
    run_dir = tmp_path / "runs" / "r1"
    out = run_dir / "output" / NAME
    first_save = out / f"{NAME}_000000010.safetensors"
    began = time.time()
    plan = make_plan(run_id="r1", spec=spec, run_dir=str(run_dir), dataset_dir=str(small_dataset),
                     provider="local", price_per_hour=36.0, billing_started_at=began)

    def clock() -> float:  # ten minutes ($6 of $5) pass once the first checkpoint is saved
        return time.time() + (600 if first_save.is_file() else 0)

    runner = Runner(plan, env={**os.environ, "AITK_STANDIN_SAVE_AT": "10",
                               "AITK_STANDIN_DELAY": "0.05"}, clock=clock)
    try:
        assert runner.run() == 0, (run_dir / "agent.log").read_text()[-3000:]
    finally:
        runner.log.close()
    status = read_status(run_dir)
    assert status["state"] == "stopped"
    train = status["stages"]["train"]["detail"]
    assert train["last_checkpoint"] == str(first_save) and 10 <= train["step"] < 200
    assert not (out / f"{NAME}_000000200.safetensors").exists()  # no waiting for the next save
    assert any(e["event"] == "costguard" and e["hard"] for e in read_events(run_dir))
    assert "hard stop" in (run_dir / "agent.log").read_text()
    receipt = json.loads((run_dir / "publish" / "receipt.json").read_text())
    assert receipt["state"] == "stopped"
    assert ck.read_step(run_dir / "publish" / f"{NAME}.safetensors") == 10


# -- what ai-toolkit will really load, and saves cut short --------------------------------------
def flux_lora(path: Path, keys: dict[str, list[int]], step: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path),
              metadata={"training_info": json.dumps({"step": step})})
    return path


FLUX_Q = "transformer.transformer_blocks.0.attn.to_q"


def test_an_outside_lora_must_fit_what_ai_toolkit_looks_for(tmp_path: Path) -> None:
    """ai-toolkit loads a LoRA non-strictly (network_mixins.load_weights): keys its Flux network
    lacks are dropped with a "Missing keys" line. Such a file is refused before anything runs."""
    good = flux_lora(tmp_path / "good.safetensors", {f"{FLUX_Q}.lora_A.weight": [4, 3072],
                                                     f"{FLUX_Q}.lora_B.weight": [3072, 4]})
    assert inspect_source(good, rank=4, flux_keys=True).pairs == 1
    sd = flux_lora(tmp_path / "sd.safetensors", {"unet.down_blocks.0.attn.to_q.lora_A.weight": [4, 320],
                                                 "unet.down_blocks.0.attn.to_q.lora_B.weight": [320, 4]})
    inspect_source(sd, rank=4)  # pairs of the right rank: the tiny trainer's check passes
    with pytest.raises(ResumeError, match="no tensor ai-toolkit would load.*Missing keys"):
        inspect_source(sd, rank=4, flux_keys=True)
    shape = flux_lora(tmp_path / "shape.safetensors", {f"{FLUX_Q}.lora_A.weight": [4, 320],
                                                       f"{FLUX_Q}.lora_B.weight": [3072, 4]})
    with pytest.raises(ResumeError, match=r"lora_A.weight has shape \[4, 320\]"):
        inspect_source(shape, rank=4, flux_keys=True)


def test_missing_keys_after_the_trainer_starts_fail_the_run(tmp_path: Path) -> None:
    """ai-toolkit prints "Missing keys: []" on every load; a non-empty list means the LoRA it
    resumed from did not load, and it would go on training from zero."""
    out = tmp_path / "output" / "fake"
    flux_lora(out / "fake_000000006.safetensors",
              {"lora_unet_double_blocks_0_img_attn_qkv.lora_A.weight": [4, 3072],
               "lora_unet_double_blocks_0_img_attn_qkv.lora_B.weight": [9216, 4]})
    rec = Recorder()
    result = run_training(fake_ctx(rec, tmp_path, {}, steps=20, max_retries=2))
    assert (result.state, result.cause, result.attempts) == ("failed", "missing_keys", 1)
    assert "Missing keys: ['lora_unet_double_blocks_0_img_attn_qkv" in result.error
    clean = tmp_path / "clean"  # a save of the stand-in's own network loads: "Missing keys: []"
    flux_lora(clean / "output" / "fake" / "fake_000000006.safetensors",
              {f"{m}.lora_{ab}.weight": [4, 3072] if ab == "A" else [3072, 4]
               for m in STANDIN_MODULES for ab in "AB"})
    rec = Recorder()
    assert run_training(fake_ctx(rec, clean, {}, steps=12)).state == "done"
    assert "Missing keys: []" in rec.text  # the line ai-toolkit always prints is no failure


def test_a_save_cut_in_half_is_set_aside_before_the_retry(tmp_path: Path) -> None:
    """SIGKILL in the middle of a save leaves half a LoRA; ai-toolkit resumes from the newest save
    by ctime and would crash on it at every retry."""
    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_KILL_IN_SAVE": "15"}, steps=30, max_retries=1)
    result = run_training(ctx)
    assert (result.state, result.attempts) == ("done", 2), result.log_tail
    out = tmp_path / "output" / "fake"
    (aside,) = out.glob("unloadable-*")
    assert [p.name for p in aside.iterdir()] == ["fake_000000015.safetensors"]
    assert not lora_is_whole(aside / "fake_000000015.safetensors")
    assert "Found step 10 in metadata" in rec.text and "moved to" in rec.text
    assert lora_is_whole(out / "fake_000000015.safetensors")  # saved again, whole


def test_set_aside_unloadable_keeps_whole_saves(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = flux_lora(out / "x_000000005.safetensors", {f"{FLUX_Q}.lora_A.weight": [4, 3072]})
    assert set_aside_unloadable(out, "x") is None  # nothing broken: nothing moved
    newest = out / "x_000000010.safetensors"
    newest.write_bytes(old.read_bytes()[:200])
    (out / "optimizer.pt").write_bytes(b"PK\x03\x04 half a zip")
    aside = set_aside_unloadable(out, "x", clock=lambda: 0.0)
    assert aside == out / "unloadable-19700101-000000"
    assert sorted(p.name for p in aside.iterdir()) == ["optimizer.pt", "x_000000010.safetensors"]
    assert old.is_file() and lora_is_whole(old)
