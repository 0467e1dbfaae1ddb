"""Progress parsing on the log line variants ai-toolkit (tqdm) and the tiny trainer print."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remote.progress import (LogWatcher, parse_bar, parse_progress, progress_main,
                             recognise_error)

REF = "my_lora:  10%|#         | 200/2000 [06:40<1:00:00,  2.00s/it, lr: 1.0e-04 loss: 4.211e-01]"

# line, then (step, total, loss, lr, s_per_step, eta_s, elapsed_s)
CASES = [
    (REF, (200, 2000, 0.4211, 1e-4, 2.0, 3600.0, 400.0)),
    ("demo:  10%|#         | 20/200 [00:02<00:18,  9.80it/s, lr: 1.0e-04 loss: 4.211e-01]",
     (20, 200, 0.4211, 1e-4, 1 / 9.80, 18.0, 2.0)),
    ("my_lora:  45%|████▌     | 900/2000 [30:00<36:40,  2.00s/it, lr: 1.0e-04 loss: 3.100e-01]",
     (900, 2000, 0.31, 1e-4, 2.0, 2200.0, 1800.0)),
    ("my_lora:  46%|████▋     | 920/2000 [1:02:03<1:12:00,  4.00s/it, lr: 4.0e-04 loss: 2.5e-01]",
     (920, 2000, 0.25, 4e-4, 4.0, 4320.0, 3723.0)),
    ("my_lora:   0%|          | 0/2000 [00:00<?, ?it/s]", (0, 2000, None, None, None, None, 0.0)),
    ("my_lora:   0%|          | 1/2000 [00:07<?, ?it/s, lr: 1.0e-04 loss: 6.021e-01]",
     (1, 2000, 0.6021, 1e-4, None, None, 7.0)),
    ("my_lora:  50%|#####     | 1000/2000 [33:20<33:20,  2.00s/it]",
     (1000, 2000, None, None, 2.0, 2000.0, 2000.0)),
    ("  5%|5         | 100/2000 [03:20<1:03:20,  2.00s/it, lr: 1e-4 loss: 0.42]",
     (100, 2000, 0.42, 1e-4, 2.0, 3800.0, 200.0)),
    ("my_lora: 100%|██████████| 2000/2000 [1:06:40<00:00,  2.00s/it, lr: 1.0e-04 loss: 1.234e-01]",
     (2000, 2000, 0.1234, 1e-4, 2.0, 0.0, 4000.0)),
    ("x: 30%|###       | 30/100 [00:01<00:02, 25.50it/s, loss: 1.5E+00, lr: 2.5E-05]",
     (30, 100, 1.5, 2.5e-5, 1 / 25.5, 2.0, 1.0)),
    ("name-with:colon:  10%|#         | 10/100 [00:10<01:30,  1.00it/s, lr: 1.0e-04 loss: 4.2e-01]",
     (10, 100, 0.42, 1e-4, 1.0, 90.0, 10.0)),
    ("my_lora:  20%|██        | 400/2000 [13:20<53:20,  2.00s/it, lr: 1.0e-04 loss: nan]",
     (400, 2000, float("nan"), 1e-4, 2.0, 3200.0, 800.0)),
    ("my_lora:  11%|█▏        | 220/2000 [10:00:00<80:00:00, 163.64s/it, lr: 1.0e-04 loss: 4.0e-01]",
     (220, 2000, 0.4, 1e-4, 163.64, 288000.0, 36000.0)),
    ("my_lora:   1%|1         | 12/1000 [00:00<00:10, 120.50it/s, lr: 1.0e-04 loss: 9.0e-01]",
     (12, 1000, 0.9, 1e-4, 1 / 120.5, 10.0, 0.0)),
    ("my_lora:   1%|1         | 12/1000 [00:00<00:01, 1.20kit/s]",
     (12, 1000, None, None, 1 / 1200, 1.0, 0.0)),
    ("Caching latents to disk: 100%|██████████| 24/24 [00:03<00:00,  7.01it/s]",
     (24, 24, None, None, 1 / 7.01, 0.0, 3.0)),
    ("my_lora:  12%|#2        | 250/2000 [08:20<58:20,  2.00s/it, lr: 1.0e-04 loss: 4.1e-01]"
     "Saving at step 250", (250, 2000, 0.41, 1e-4, 2.0, 3500.0, 500.0)),
]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if a != a or b != b:  # nan
        return a != a and b != b
    return abs(a - b) <= 1e-9 + 1e-6 * abs(b)


@pytest.mark.parametrize("line,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_line_variants(line: str, expected: tuple) -> None:
    bar = parse_bar(line)
    assert bar is not None
    p = bar[2]
    got = (p.step, p.total, p.loss, p.lr, p.s_per_step, p.eta_s, p.elapsed_s)
    assert all(_close(g, e) for g, e in zip(got, expected)), got


@pytest.mark.parametrize("line", [
    "Loading Flux model", "create LoRA network. base dim (rank): 16, alpha: 16",
    "  -  Found 24 images", "step 401/2000 done", "100%|bar", "",
])
def test_non_progress_lines(line: str) -> None:
    assert parse_progress(line) is None


def test_latest_of_many_redraws_with_cr_and_lf() -> None:
    text = ("Loading Flux model\n"
            "my_lora:   0%|          | 0/50 [00:00<?, ?it/s]"
            "\rmy_lora:   2%|2         | 1/50 [00:02<01:38,  2.00s/it, lr: 1.0e-04 loss: 5.0e-01]"
            "\rmy_lora:   4%|4         | 2/50 [00:04<01:36,  2.00s/it, lr: 1.0e-04 loss: 4.5e-01]\n"
            "Saving at step 2\n")
    p = parse_progress(text)
    assert (p.step, p.loss) == (2, 0.45)
    assert p.to_dict()["s_per_step"] == 2.0


@pytest.mark.parametrize("text,cause", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "cuda_oom"),
    ("RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB", "cuda_oom"),
    ("requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: https://huggingface.co/x",
     "hf_auth"),
    ("huggingface_hub.errors.GatedRepoError: 403 Client Error. Cannot access gated repo for url",
     "hf_auth"),
    ("OSError: black-forest-labs/FLUX.1-dev does not appear to have a file named config.json.",
     "hf_auth"),
    ("Access to model black-forest-labs/FLUX.1-dev is restricted. You must have access to it",
     "hf_auth"),
    ("ImportError: cannot import name 'FluxPipeline' from 'diffusers'", "import_error"),
    ("ModuleNotFoundError: No module named 'optimum'", "import_error"),
    ("OSError: [Errno 28] No space left on device", "disk_full"),
    ("my_lora:  20%|##        | 401/2000 [13:22<53:18,  2.00s/it, lr: 1.0e-04 loss: 4.0e-01]", None),
    ("Saved checkpoint to output/x/x_000000403.safetensors", None),
])
def test_recognise_error(text: str, cause: str | None) -> None:
    assert recognise_error(text) == cause


def test_first_error_wins() -> None:
    log = ("ModuleNotFoundError: No module named 'foo'\n"
           "Error running job: CUDA out of memory\n")
    assert recognise_error(log) == "import_error"


def test_watcher_incremental_byte_by_byte() -> None:
    log = ("create LoRA network. base dim (rank): 16, alpha: 16\n"
           "\rmy_lora:   0%|          | 0/500 [00:00<?, ?it/s]"
           "\rmy_lora:  50%|█████     | 250/500 [08:20<08:20,  2.00s/it, lr: 1.0e-04 loss: 4.2e-01]\n"
           "Saving at step 250\n"
           "Saved checkpoint to C:\\runs\\my_lora\\my_lora_000000250.safetensors\r\n"
           "\rmy_lora:  50%|█████     | 251/500 [08:22<08:18,  2.00s/it, lr: 1.0e-04 loss: 4.1e-01]")
    watcher = LogWatcher("my_lora")
    events = []
    for i in range(len(log.encode())):  # every split point, multi-byte block characters included
        events += watcher.feed(log.encode()[i:i + 1])
    kinds = [e.kind for e in events]
    # the 0/500 bar has no lr:/loss: yet (a bar, not progress); training again ends a save that
    # printed no optimizer line
    assert kinds == ["bar", "progress", "saving", "checkpoint", "saved", "progress"]
    assert [e.progress.step for e in events if e.kind == "progress"] == [250, 251]
    saved = events[3]
    assert saved.path == "C:\\runs\\my_lora\\my_lora_000000250.safetensors" and saved.step == 250
    assert watcher.saves == 1 and not watcher.saving
    assert watcher.close() == []  # the last redraw was already reported when its ] arrived


OTHER_BARS_LOG = (
    "Loading checkpoint shards: 100%|██████████| 2/2 [00:03<00:00,  1.50s/it]\n"
    "Caching latents to disk:  50%|█████     | 12/24 [00:01<00:01,  7.01it/s]"
    "\rCaching latents to disk: 100%|██████████| 24/24 [00:03<00:00,  7.01it/s]\n"
    "\rmy_lora:   0%|          | 0/500 [00:00<?, ?it/s]"
    "\rmy_lora:  10%|█         | 50/500 [01:40<15:00,  2.00s/it, lr: 1.0e-04 loss: 4.2e-01]"
    "\rmy_lora:  10%|█         | 50/500 [01:40<15:00,  2.00s/it, lr: 1.0e-04 loss: 4.2e-01]\n"
    "Generating Images:  50%|█████     | 1/2 [00:05<00:05,  5.00s/it]\n"
    "\rmy_lora:  10%|█         | 51/500 [01:50<15:00,  2.00s/it]\n"
    "Generating Images: 100%|██████████| 2/2 [00:10<00:00,  5.00s/it]\n"
)


def test_other_tqdm_bars_are_not_training_progress() -> None:
    named = LogWatcher("my_lora")
    steps = [e.progress.step for e in named.feed(OTHER_BARS_LOG.encode()) if e.kind == "progress"]
    assert steps == [50, 50]  # the job's bar with lr:/loss: only
    unnamed = LogWatcher()  # learns the training bar from its lr:/loss: postfix
    steps = [e.progress.step for e in unnamed.feed(OTHER_BARS_LOG.encode()) if e.kind == "progress"]
    assert steps == [50, 50]
    assert (parse_progress(OTHER_BARS_LOG).step, parse_progress(OTHER_BARS_LOG).total) == (50, 500)
    assert parse_progress(OTHER_BARS_LOG.split("\n")[0]) is None  # no training bar, no step


def test_watcher_saving_state_and_final_checkpoint_step() -> None:
    watcher = LogWatcher()
    watcher.feed(b"\rdemo: 100%|##########| 40/40 [00:01<00:00, 30.00it/s, lr: 1.0e-04 loss: 2.0e-01]")
    assert watcher.feed(b"\nSaving at step 40\n")[0].kind == "saving"
    assert watcher.saving
    events = watcher.feed(b"Saved checkpoint to /w/out/demo/demo.safetensors")
    assert events == [] and watcher.saving  # the path may not be complete yet
    (event,) = watcher.feed(b"\n")
    assert (event.kind, event.step, event.path) == ("checkpoint", 40, "/w/out/demo/demo.safetensors")
    assert watcher.saving and not watcher.final_saved  # optimizer.pt is written after the LoRA
    (event,) = watcher.feed(b"Saved optimizer to /w/out/demo/optimizer.pt\n")
    assert event.kind == "saved" and not watcher.saving and watcher.final_saved
    assert watcher.phase == "final sampling"


def test_watcher_records_first_error() -> None:
    watcher = LogWatcher()
    events = watcher.feed(b"Traceback (most recent call last):\n  File x\n"
                          b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB\n"
                          b"Error running job: CUDA out of memory\n")
    assert [e.cause for e in events if e.kind == "error"] == ["cuda_oom", "cuda_oom"]
    assert watcher.cause == "cuda_oom" and watcher.error_line.startswith("torch.OutOfMemoryError")


def test_progress_main_prints_json(tmp_path: Path, capsys) -> None:
    log = tmp_path / "agent.log"
    log.write_bytes(("Loading Flux model\n" + "\r".join([REF.replace("200/2000", f"{s}/2000")
                                                          for s in (198, 199, 200)])
                     + "\nSaving at step 250\nSaved checkpoint to "
                       "output/my_lora/my_lora_000000250.safetensors\n"
                       "ImportError: cannot import name 'x'\n").encode())
    assert progress_main(str(log)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 200 and data["total"] == 2000 and data["loss"] == 0.4211
    assert data["lr"] == 1e-4 and data["s_per_step"] == 2.0 and data["eta_s"] == 3600.0
    assert data["last_checkpoint"] == "output/my_lora/my_lora_000000250.safetensors"
    assert data["error"] == "import_error"


def test_progress_main_missing_file(tmp_path: Path, capsys) -> None:
    assert progress_main(str(tmp_path / "nope.log")) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_entry_point(tmp_path: Path) -> None:
    import subprocess
    import sys

    log = tmp_path / "t.log"
    log.write_text(REF + "\r")
    out = subprocess.run([sys.executable, "-m", "remote", "progress", str(log)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["step"] == 200


def test_a_redraw_at_the_same_count_does_not_end_a_save() -> None:
    """tqdm's monitor thread may refresh the bar while ai-toolkit saves (the count unchanged):
    the save is over at "Saved optimizer to", or at a later step for a trainer without it."""
    bar = "\rdemo:  25%|##5       | {n}/40 [00:01<00:03, 10.00it/s, lr: 1.0e-04 loss: 2.0e-01]"
    watcher = LogWatcher("demo")
    watcher.feed((bar.format(n=10) + "\nSaving at step 10\n"
                  "Saved checkpoint to /o/demo/demo_000000010.safetensors\n").encode())
    watcher.feed(bar.format(n=10).encode() + b"\n")
    assert watcher.saving and watcher.saves == 0 and watcher.phase == "saving"
    assert [e.kind for e in watcher.feed(bar.format(n=11).encode() + b"\n")] == ["saved", "progress"]
    assert not watcher.saving and watcher.saves == 1
