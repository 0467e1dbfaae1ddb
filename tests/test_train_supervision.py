"""The train supervisor driving the real tiny trainer and the ai-toolkit stand-in."""

from __future__ import annotations

import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from remote.progress import Progress
from remote.train import (TrainContext, TrainResult, default_stop_policy, read_lora_step,
                          render_tail, run_training, trainer_command)
from remote.resume import lora_is_whole
from tests.aitk_standin import SCRIPT, write_config
from tests.test_tiny_trainer import write_job

class Recorder:
    """Collects what the supervisor reports; ``stop_when`` decides when a stop is requested."""

    def __init__(self, stop_when=lambda rec: False) -> None:
        self.log: list[str] = []
        self.progress: list[Progress] = []
        self.checkpoints: list[tuple[Path, int]] = []
        self.stop_when = stop_when

    @property
    def text(self) -> str:
        return "".join(self.log)

    def ctx(self, config: Path, output_dir: Path, name: str, command: list[str], *,
            env: dict[str, str] | None = None, max_retries: int = 0, total: int = 0,
            **extra: Any) -> TrainContext:
        return TrainContext(
            config_path=config, output_dir=output_dir, name=name, command=command,
            log=self.log.append, env=env or {}, stop_requested=lambda: self.stop_when(self),
            on_progress=self.progress.append,
            on_checkpoint=lambda path, step: self.checkpoints.append((path, step)),
            max_retries=max_retries, total_steps=total, cwd=config.parent, poll_s=0.05, **extra)


def tiny_ctx(rec: Recorder, config: Path, **kw: Any) -> TrainContext:
    command = trainer_command({"training": {"trainer": "tiny"}}, config, None)
    return rec.ctx(config, config.parent / "output" / "demo", "demo", command, **kw)


def fake_ctx(rec: Recorder, tmp_path: Path, env: dict[str, str], *, steps: int = 40,
             save_every: int = 5, sample_every: int = 0, prompts: int = 0,
             **kw: Any) -> TrainContext:
    """The ai-toolkit stand-in as ``run.py`` of a checkout in ``tmp_path``, job ``fake``."""
    shutil.copy(SCRIPT, tmp_path / "run.py")
    config = write_config(tmp_path / "job.yaml", name="fake", training_folder=tmp_path / "output",
                          steps=steps, save_every=save_every, sample_every=sample_every,
                          prompts=prompts)
    out = tmp_path / "output" / "fake"
    command = trainer_command({"training": {"trainer": "ai-toolkit"}}, config, tmp_path)
    assert command == [sys.executable, "run.py", str(config)]
    return rec.ctx(config, out, "fake", command, env=env, total=kw.pop("total", steps),
                   save_every=save_every, sample_every=sample_every, **kw)


def test_tiny_run_to_done(tmp_path: Path) -> None:
    config = write_job(tmp_path, steps=30, save_every=10, keep=4, sample_every=None)
    rec = Recorder()
    result = run_training(tiny_ctx(rec, config, total=30))
    assert result.state == "done", result.log_tail
    out = tmp_path / "output" / "demo"
    assert result.final_lora == out / "demo.safetensors" and result.final_lora.is_file()
    assert result.step == 30 and result.error is None and result.attempts == 1
    assert result.s_per_step is not None and result.s_per_step > 0
    assert [s for _, s in rec.checkpoints] == [10, 20, 30]
    assert rec.checkpoints[0][0] == out / "demo_000000010.safetensors"
    assert rec.progress[-1].step == 30 and rec.progress[-1].total == 30
    assert "| 30/30 [" in rec.text and "Saved checkpoint to" in rec.text  # every byte teed
    assert result.to_dict()["final_lora"] == str(out / "demo.safetensors")


def test_stop_between_saves_then_continue(tmp_path: Path) -> None:
    config = write_job(tmp_path, steps=200, save_every=1000, sample_every=None)
    rec = Recorder(stop_when=lambda r: bool(r.progress) and r.progress[-1].step >= 5)
    result = run_training(tiny_ctx(rec, config, total=200,
                                   env={"FLUX_REMOTE_TINY_STEP_DELAY": "0.05"}))
    assert result.state == "stopped", result.log_tail
    assert result.final_lora is None and result.error is None
    assert result.last_checkpoint is not None and result.last_checkpoint.is_file()
    stopped_at = result.step
    assert 5 <= stopped_at < 200
    assert result.last_checkpoint.name == f"demo_{stopped_at:09d}.safetensors"
    assert rec.checkpoints == [(result.last_checkpoint, stopped_at)]

    config = write_job(tmp_path, steps=stopped_at + 10, save_every=1000, sample_every=None,
                       dataset=tmp_path / "data")
    again = Recorder()
    result = run_training(tiny_ctx(again, config, total=stopped_at + 10))
    assert result.state == "done" and result.step == stopped_at + 10
    assert again.progress[0].step == stopped_at + 1  # continued (the first bar has no loss yet)
    assert f"Found step {stopped_at} in metadata" in again.text


def test_stop_requested_before_start(tmp_path: Path) -> None:
    config = write_job(tmp_path, steps=10, sample_every=None)
    rec = Recorder(stop_when=lambda r: True)
    result = run_training(tiny_ctx(rec, config, total=10))
    assert (result.state, result.attempts, result.last_checkpoint) == ("stopped", 0, None)
    assert not (tmp_path / "output").exists()


def test_crash_is_retried_from_the_checkpoint(tmp_path: Path) -> None:
    config = write_job(tmp_path, steps=20, save_every=5, sample_every=None)
    rec = Recorder()
    result = run_training(tiny_ctx(rec, config, total=20, max_retries=1,
                                   env={"FLUX_REMOTE_TINY_CRASH_AT_STEP": "12"}))
    assert result.state == "done" and result.attempts == 2 and result.step == 20
    assert "CUDA out of memory" in rec.text
    assert "[train] trainer crashed (cuda_oom); retrying from" in rec.text
    assert "Found step 10 in metadata" in rec.text


def test_crash_without_retries_fails_with_cause(tmp_path: Path) -> None:
    config = write_job(tmp_path, steps=20, save_every=5, sample_every=None)
    rec = Recorder()
    result = run_training(tiny_ctx(rec, config, total=20, max_retries=0,
                                   env={"FLUX_REMOTE_TINY_CRASH_AT_STEP": "12"}))
    assert result.state == "failed" and result.cause == "cuda_oom" and result.attempts == 1
    assert result.error.startswith("trainer exited with code 1: ")
    assert "CUDA out of memory" in result.error
    assert 0 < len(result.log_tail) <= 50
    assert any(line.startswith("Error running job: CUDA out of memory") for line in result.log_tail)
    assert any("RuntimeError" in line for line in result.log_tail)
    assert result.last_checkpoint == tmp_path / "output" / "demo" / "demo_000000010.safetensors"
    assert result.step == 11 and result.final_lora is None


def whole(path: Path) -> bool:
    """The file loads: a LoRA whose tensors are all there, or an optimizer archive that opens."""
    if path.suffix == ".pt":
        try:
            return zipfile.ZipFile(path).testzip() is None
        except (OSError, zipfile.BadZipFile):
            return False
    return read_lora_step(path) is not None and lora_is_whole(path)


@pytest.mark.parametrize("failure,cause,line", [
    ("hf_401", "hf_auth", "401 Client Error: Unauthorized"),
    ("import", "import_error", "cannot import name 'FluxKontextPipeline' from 'diffusers'"),
    ("disk@save5", "disk_full", "No space left on device"),
])
def test_unfixable_causes_are_not_retried(tmp_path: Path, failure: str, cause: str,
                                          line: str) -> None:
    rec = Recorder()
    result = run_training(fake_ctx(rec, tmp_path, {"AITK_STANDIN_FAIL": failure}, max_retries=3))
    assert (result.state, result.cause, result.attempts) == ("failed", cause, 1)
    assert any(line in tail for tail in result.log_tail)


def test_ai_toolkit_stop_waits_for_the_next_save(tmp_path: Path) -> None:
    rec = Recorder(stop_when=lambda r: bool(r.progress) and r.progress[-1].step >= 2)
    ctx = fake_ctx(rec, tmp_path, {}, steps=400, save_every=10)
    assert default_stop_policy(ctx.command) == "after_next_save"
    result = run_training(ctx)
    assert result.state == "stopped", result.log_tail
    assert result.last_checkpoint == tmp_path / "output" / "fake" / "fake_000000010.safetensors"
    assert whole(result.last_checkpoint)
    assert rec.checkpoints == [(result.last_checkpoint, 10)]
    assert 10 <= rec.progress[-1].step < 20  # SIGTERM came right after the save


@pytest.mark.parametrize("policy", ["after_next_save", "sigterm"])
def test_stop_during_a_save_waits_for_the_optimizer_state(tmp_path: Path, policy: str) -> None:
    """ai-toolkit prints "Saved checkpoint to" before it writes optimizer.pt
    (``BaseSDTrainProcess.save``): a stop asked for in between must let that write finish."""
    ckpt = tmp_path / "output" / "fake" / "fake_000000005.safetensors"
    optimizer = ckpt.with_name("optimizer.pt")
    rec = Recorder(stop_when=lambda r: bool(r.checkpoints))  # "Saved checkpoint to" was read
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_SAVE_DELAY": "0.5"}, steps=400,
                   stop_policy=policy)
    result = run_training(ctx)
    assert result.state == "stopped"
    assert whole(ckpt) and whole(optimizer), rec.text[-2000:]
    assert rec.text.rindex(f"Saved optimizer to {optimizer}") > rec.text.rindex("Saved checkpoint")
    assert result.last_checkpoint == ckpt and result.step >= 5
    assert not (tmp_path / "output" / "fake" / "fake_000000010.safetensors").exists()


@pytest.mark.parametrize("old_bar", ["0", "1"])
@pytest.mark.parametrize("policy", ["after_next_save", "sigterm"])
def test_a_hard_stop_after_the_last_step_lets_the_final_save_finish(tmp_path: Path,
                                                                   policy: str,
                                                                   old_bar: str) -> None:
    """ai-toolkit saves its final LoRA after the last step with no "Saving at step" line; a hard
    stop that lands then must not cut the save short. Before the pinned commit the bar never
    reached total/total (it showed the step index), so that cannot be what tells the end."""
    final = tmp_path / "output" / "fake" / "fake.safetensors"
    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_SAVE_DELAY": "1.0", "AITK_STANDIN_OLD_BAR": old_bar},
                   steps=20, save_every=1000, stop_policy=policy,
                   stop_now=lambda: final.is_file())  # the final save has begun
    result = run_training(ctx)
    assert whole(final) and whole(final.with_name("optimizer.pt")), rec.text[-2000:]
    # then stopped (ai-toolkit would go on sampling) or already ended: the final LoRA is kept
    assert result.state in ("stopped", "done") and result.step == 20, result.log_tail
    assert result.last_checkpoint == final


def test_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    rec = Recorder(stop_when=lambda r: bool(r.progress))
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_IGNORE_TERM": "1"}, steps=4000,
                   stop_policy="sigterm", grace_s=0.3)
    result = run_training(ctx)
    assert result.state == "stopped"
    assert "s after SIGTERM: SIGKILL" in rec.text


def test_a_command_that_cannot_start_fails_at_once(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("job: extension\n")
    rec = Recorder()
    ctx = rec.ctx(config, tmp_path / "output" / "x", "x", [str(tmp_path / "no-such-python"), "run.py"],
                  max_retries=3)
    result = run_training(ctx)
    assert (result.state, result.attempts) == ("failed", 1)
    assert result.error.startswith("cannot start the trainer") and result.log_tail == [result.error]


def test_trainer_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    assert trainer_command({"training": {"trainer": "tiny"}}, cfg, None) == [
        sys.executable, "-m", "remote.trainers.tiny", str(cfg)]
    venv_python = tmp_path / "aitk" / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert trainer_command({"training": {}}, cfg, tmp_path / "aitk") == [
        str(venv_python), "run.py", str(cfg)]
    custom = {"training": {"trainer": "ai-toolkit", "command": ["python", "x.py", "-c", "{config}"]}}
    assert trainer_command(custom, cfg, None) == ["python", "x.py", "-c", str(cfg)]
    with pytest.raises(ValueError):
        trainer_command({"training": {"trainer": "ai-toolkit"}}, cfg, None)
    assert default_stop_policy(trainer_command({"training": {"trainer": "tiny"}}, cfg, None)) == "sigterm"


def test_render_tail_shows_the_last_redraw() -> None:
    data = b"a\rb\rc\nline two\n\rbar 1\rbar 2\n\n" + b"".join(b"x%d\n" % i for i in range(60))
    tail = render_tail(data)
    assert len(tail) == 50 and tail[-1] == "x59"
    assert render_tail(b"a\rb\rc\nline two\n\rbar 1\rbar 2") == ["c", "line two", "bar 2"]


def test_result_is_json_ready() -> None:
    result = TrainResult("failed", None, Path("/x/y.safetensors"), 3, "boom", "cuda_oom", ["l"], 1.5)
    assert result.to_dict()["last_checkpoint"] == "/x/y.safetensors"


@pytest.mark.parametrize("failure,cause", [
    ("oom@3", "cuda_oom"),  # torch.OutOfMemoryError
    ("cuda_async@3", "cuda_oom"),  # "CUDA error: out of memory" from an asynchronous kernel
    ("oom_steps@3", "cuda_oom"),  # ai-toolkit's own abort after three skipped batches
    ("import", "import_error"), ("module", "import_error"),
    ("hf_401", "hf_auth"), ("hf_gated", "hf_auth"), ("no_config", "hf_auth"),
    ("disk@save5", "disk_full"),
])
def test_causes_are_recognised_from_the_real_text(tmp_path: Path, failure: str,
                                                   cause: str) -> None:
    rec = Recorder()
    result = run_training(fake_ctx(rec, tmp_path, {"AITK_STANDIN_FAIL": failure}))
    assert (result.state, result.cause) == ("failed", cause), result.log_tail


def test_a_silent_phase_is_a_stall_named_after_it(tmp_path: Path) -> None:
    """The baseline sampling is known to hang with no output; a clock 100x faster than the wall
    stands for its budget running out."""
    deadline = time.monotonic() + 60  # on code that does not see stalls, the test ends anyway
    rec = Recorder(stop_when=lambda r: time.monotonic() > deadline)
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_HANG": "baseline"},
                   clock=lambda: time.monotonic() * 100)
    ctx.stall_budgets = {**ctx.stall_budgets, "baseline sampling": 50.0}
    result = run_training(ctx)
    assert (result.state, result.cause) == ("failed", "stall"), result.log_tail
    assert "printed nothing" in result.error and "during baseline sampling" in result.error
    assert "[train] stall: the trainer printed nothing" in rec.text


def test_a_stall_after_the_final_save_keeps_the_lora(tmp_path: Path) -> None:
    """Hung in the final samples: the final LoRA and its optimizer state are saved, the run is
    done (a retry would only save it again)."""
    deadline = time.monotonic() + 60
    rec = Recorder(stop_when=lambda r: time.monotonic() > deadline)
    ctx = fake_ctx(rec, tmp_path, {"AITK_STANDIN_HANG": "final"}, steps=12,
                   clock=lambda: time.monotonic() * 100)
    ctx.stall_budgets = {**ctx.stall_budgets, "final sampling": 50.0}
    result = run_training(ctx)
    assert result.state == "done" and result.final_lora is not None, result.log_tail
    assert "during final sampling" in rec.text
