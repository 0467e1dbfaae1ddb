"""The train supervisor driving the real tiny trainer and a fake ai-toolkit script."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from remote.progress import Progress
from remote.train import (TrainContext, TrainResult, default_stop_policy, render_tail,
                          run_training, trainer_command)
from tests.test_tiny_trainer import write_job

FAKE_AITK = textwrap.dedent('''\
    """Prints what ai-toolkit prints: a tqdm bar on stderr, save lines on stdout."""
    import os, signal, sys, time
    from pathlib import Path

    out = Path(os.environ["FAKE_OUT"])
    total, every = int(os.environ.get("FAKE_STEPS", "40")), int(os.environ.get("FAKE_SAVE_EVERY", "5"))
    delay, save_delay = float(os.environ.get("FAKE_DELAY", "0.02")), float(os.environ.get("FAKE_SAVE_DELAY", "0"))
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out.mkdir(parents=True, exist_ok=True)
    print("Loading Flux model", flush=True)
    if os.environ.get("FAKE_FAIL"):
        print(os.environ["FAKE_FAIL"], flush=True)
        print("Error running job: failed", flush=True)
        sys.exit(1)

    def save(path, announce=True):
        if announce:  # ai-toolkit announces its step saves only, not the final one
            print(f"Saving at step {step}", flush=True)
        path.write_text("partial")
        time.sleep(save_delay)
        path.write_text("complete")
        print(f"Saved checkpoint to {path}", flush=True)

    for step in range(1, total + 1):
        time.sleep(delay)
        pct = step * 100 // total
        bar = ("\\u2588" * (pct // 10)).ljust(10)
        sys.stderr.write(f"\\rfake: {pct:3d}%|{bar}| {step}/{total} [00:{step % 60:02d}<00:10,  2.00s/it, "
                         f"lr: 1.0e-04 loss: 4.0e-01]")
        sys.stderr.flush()
        if step % every == 0 and step < total:
            save(out / f"fake_{step:09d}.safetensors")
    sys.stderr.write("\\n")
    save(out / "fake.safetensors", announce=False)
''')


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


def fake_ctx(rec: Recorder, tmp_path: Path, env: dict[str, str], **kw: Any) -> TrainContext:
    script = tmp_path / "run.py"
    script.write_text(FAKE_AITK)
    config = tmp_path / "job.yaml"
    config.write_text("job: extension\n")
    out = tmp_path / "output" / "fake"
    command = trainer_command({"training": {"trainer": "ai-toolkit"}}, config, tmp_path)
    assert command == [sys.executable, "run.py", str(config)]
    return rec.ctx(config, out, "fake", command, env={"FAKE_OUT": str(out), **env}, **kw)


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
    assert again.progress[0].step == stopped_at  # continued, did not start over
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


@pytest.mark.parametrize("line,cause", [
    ("requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: https://hf.co/x",
     "hf_auth"),
    ("ImportError: cannot import name 'FluxPipeline' from 'diffusers'", "import_error"),
    ("OSError: [Errno 28] No space left on device", "disk_full"),
])
def test_unfixable_causes_are_not_retried(tmp_path: Path, line: str, cause: str) -> None:
    rec = Recorder()
    result = run_training(fake_ctx(rec, tmp_path, {"FAKE_FAIL": line}, max_retries=3))
    assert (result.state, result.cause, result.attempts) == ("failed", cause, 1)
    assert line in result.log_tail


def test_ai_toolkit_stop_waits_for_the_next_save(tmp_path: Path) -> None:
    rec = Recorder(stop_when=lambda r: bool(r.progress) and r.progress[-1].step >= 2)
    ctx = fake_ctx(rec, tmp_path, {"FAKE_STEPS": "400", "FAKE_SAVE_EVERY": "10"}, total=400)
    assert default_stop_policy(ctx.command) == "after_next_save"
    result = run_training(ctx)
    assert result.state == "stopped", result.log_tail
    assert result.last_checkpoint == tmp_path / "output" / "fake" / "fake_000000010.safetensors"
    assert result.last_checkpoint.read_text() == "complete"
    assert rec.checkpoints == [(result.last_checkpoint, 10)]
    assert 10 <= rec.progress[-1].step < 20  # SIGTERM came right after the save


@pytest.mark.parametrize("policy", ["after_next_save", "sigterm"])
def test_stop_during_a_save_never_interrupts_it(tmp_path: Path, policy: str) -> None:
    ckpt = tmp_path / "output" / "fake" / "fake_000000005.safetensors"

    def mid_save(rec: Recorder) -> bool:
        return ckpt.is_file() and ckpt.read_text() == "partial"

    rec = Recorder(stop_when=mid_save)
    ctx = fake_ctx(rec, tmp_path, {"FAKE_STEPS": "400", "FAKE_SAVE_DELAY": "0.5"}, total=400,
                   stop_policy=policy)
    result = run_training(ctx)
    assert result.state == "stopped"
    assert ckpt.read_text() == "complete"
    assert result.last_checkpoint == ckpt and result.step >= 5
    assert not (tmp_path / "output" / "fake" / "fake_000000010.safetensors").exists()


@pytest.mark.parametrize("policy", ["after_next_save", "sigterm"])
def test_a_hard_stop_after_the_last_step_lets_the_final_save_finish(tmp_path: Path,
                                                                   policy: str) -> None:
    """ai-toolkit saves its final LoRA after the last step with no "Saving at step" line; a hard
    stop that lands then must not cut that file in half."""
    final = tmp_path / "output" / "fake" / "fake.safetensors"
    rec = Recorder()
    ctx = fake_ctx(rec, tmp_path, {"FAKE_STEPS": "20", "FAKE_SAVE_EVERY": "1000",
                                   "FAKE_SAVE_DELAY": "1.0"}, total=20, stop_policy=policy,
                   stop_now=lambda: final.is_file())  # the final save has begun
    result = run_training(ctx)
    assert final.read_text() == "complete"  # whole: the stop waited for the final save
    # then stopped (ai-toolkit would go on sampling) or already ended: the final LoRA is kept
    assert result.state in ("stopped", "done") and result.step == 20, result.log_tail
    assert result.last_checkpoint == final


def test_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    rec = Recorder(stop_when=lambda r: bool(r.progress))
    ctx = fake_ctx(rec, tmp_path, {"FAKE_STEPS": "4000", "FAKE_IGNORE_TERM": "1"}, total=4000,
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
