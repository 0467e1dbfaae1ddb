"""A trainer left by a killed agent: recorded in ``work/trainer.pid`` while it runs, its whole
process group ended by the next agent, a reused pid left alone, the /proc scan only without a
pid file (the scan itself: tests/test_runner.py::test_trainer_pids_reads_command_lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from remote.stages.orphans import _group, alive, end_leftover, find_leftover
from remote.train import TrainContext, read_pid_file, run_training, write_pid_file

# a "trainer" with a child in its group, both naming nothing but the config on their command line
LEFTOVER = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('ready', flush=True); time.sleep(60)")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_pid_file_names_the_group_that_is_ended(tmp_path: Path) -> None:
    config = tmp_path / "work" / "config.yaml"
    pid_file = tmp_path / "work" / "trainer.pid"
    proc = subprocess.Popen([sys.executable, "-c", LEFTOVER, str(config)],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        wait_until(lambda: len(_group(proc.pid)) == 2)
        members = _group(proc.pid)
        write_pid_file(pid_file, proc.pid, proc.pid, config)

        leftover = find_leftover(pid_file, config_path=None)  # no scan needed: the file says
        assert leftover is not None and leftover.source == "pid_file"
        assert leftover.pgid == proc.pid and leftover.pids == [proc.pid]
        end_leftover(leftover, wait_s=0.0)
        assert proc.wait(timeout=5) == -15  # SIGTERM reached the leader ...
        wait_until(lambda: not any(alive(pid) for pid in members))  # ... and its child
        assert find_leftover(pid_file, config) is None  # the pid is gone: stale, nothing to end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
        proc.stdout.close()


def test_a_reused_pid_is_left_alone_and_no_scan_runs(tmp_path: Path) -> None:
    config = tmp_path / "work" / "config.yaml"
    pid_file = tmp_path / "work" / "trainer.pid"
    # the recorded pid now belongs to another program (this test), whose argv lacks the config
    write_pid_file(pid_file, os.getpid(), os.getpgid(0), config)
    proc_root = tmp_path / "proc"  # a scan would find pid 4242 naming the config
    (proc_root / "4242").mkdir(parents=True)
    (proc_root / "4242" / "cmdline").write_bytes(b"python\0run.py\0" + str(config).encode() + b"\0")
    assert find_leftover(pid_file, config, proc_root) is None
    pid_file.unlink()
    leftover = find_leftover(pid_file, config, proc_root)  # without a pid file: the scan
    assert leftover is not None and leftover.source == "scan" and leftover.pids == [4242]
    pid_file.write_text("not json")
    assert read_pid_file(pid_file) is None


def test_the_supervisor_records_the_trainer_while_it_runs(tmp_path: Path) -> None:
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    pid_file = tmp_path / "work" / "trainer.pid"
    script = ("import pathlib, sys; print(pathlib.Path(sys.argv[1]).read_text()); "
              "pathlib.Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True); "
              "pathlib.Path(sys.argv[2]).write_text('x')")
    log: list[str] = []
    ctx = TrainContext(
        config_path=config, output_dir=out, name="demo",
        command=[sys.executable, "-c", script, str(pid_file), str(out / "demo.safetensors")],
        log=log.append, env={}, stop_requested=lambda: False, on_progress=lambda p: None,
        on_checkpoint=lambda p, s: None, max_retries=0, total_steps=1, cwd=tmp_path,
        pid_file=pid_file)
    result = run_training(ctx)
    assert result.state == "done", "".join(log)
    seen = json.loads(next(line for line in "".join(log).splitlines() if line.startswith("{")))
    assert seen["pid"] == seen["pgid"] and seen["config"] == str(config)
    assert not pid_file.exists()  # removed once the trainer ended
